"""CP heads on a frozen (or jointly trained) Hugging Face backbone across processes: ddp, and FSDP2
(``fsdp``) with frozen and trainable parameters in separate units, on 2 CPU processes over gloo. The
tiny offline models and helpers come from ``test_hf_backbone``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mtp_lightning.cli import main  # noqa: E402
from mtp_lightning.config import LossConfig  # noqa: E402
from mtp_lightning.model.hf_backbone import HFTrunk, check_units, fsdp_units  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_with_a_frozen_backbone(base_weights, fit_args, tiny_hf, tmp_path):
    """Two CPU processes (gloo): DDP syncs only the heads; the checkpoint still omits the backbone."""
    from mtp_lightning.checkpoints.io import META_KEY, load_for_inference, safe_load

    folder = tiny_hf(tmp_path / "gpt2", "gpt2")
    code = main(fit_args(folder, tmp_path / "runs", "ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                         "trainer.strategy=ddp_spawn", "trainer.max_steps=4", "checkpoint.every_n_steps=2"))
    assert code == 0
    path = tmp_path / "runs" / "ddp" / "checkpoints" / "last.ckpt"
    ckpt = safe_load(path)
    assert ckpt["global_step"] == 4 and "base_model" in ckpt[META_KEY]
    assert not any(k.startswith("model.trunk.") for k in ckpt["state_dict"])
    model, _, _ = load_for_inference(path)
    trunk = model.trunk.lm.state_dict()
    assert all(torch.equal(trunk[k], v) for k, v in base_weights(folder).items())


# ---- FSDP units -------------------------------------------------------------------------------------


def test_fsdp_units_never_mix_frozen_and_trainable(hf_model, base_folder):
    model = hf_model(base_folder)
    units = fsdp_units(model)
    # two decoder layers, then the trunk with what they leave (embeddings, final norm, output layer)
    assert len(units) == 2 + 1 and units[-1][0] is model.trunk and isinstance(model.trunk, HFTrunk)
    assert [holds_u for _, holds_u in units] == [False, False, True]
    check_units([u for u, _ in units] + [model])  # the root keeps only the (trainable) heads
    joint = hf_model(base_folder, train_mode="joint")
    check_units([u for u, _ in fsdp_units(joint)] + [joint])
    block = hf_model(base_folder, kind="block", n_future=2)  # each head layer is a unit of its own
    units = fsdp_units(block)
    assert [u for u, _ in units[3:]] == list(block.heads.blocks)
    check_units([u for u, _ in units] + [block])


FSDP_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from mtp_lightning.config import BackboneConfig, HeadsConfig, LossConfig, ModelConfig
from mtp_lightning.objectives.cp_loss import cp_objective
from mtp_lightning.model.cp_model import CPModel
from mtp_lightning.model.hf_backbone import shard_frozen_backbone
dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:" + sys.argv[2])
model = CPModel(ModelConfig(backbone=BackboneConfig(kind="hf", name_or_path=sys.argv[1]),
                            heads=HeadsConfig(n_future=3, rank=2)))
shard_frozen_backbone(model, fully_shard, mesh=init_device_mesh("cpu", (1,)))
ids = torch.randint(1, 300, (2, 12))
targets = torch.stack([ids[:, s + 1: s + 10] for s in range(3)], -1)
for _ in range(2):
    z, states = model(ids[:, :9])
    cp_objective(model.heads, z, states, model.unembedding, targets, LossConfig()).loss.backward()
assert model.heads.next_weight.grad is not None and model.heads.draft_weight.grad is not None
print("fsdp-ok")
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_units_run_forward_and_backward_on_one_cpu_process(base_folder, free_port):
    """FSDP2 (``fully_shard``) on a 1-process gloo group: the trunk's units gather their weights, the
    heads and the loss read U after the trunk ran, and the backward reaches the heads only."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, str(base_folder), str(free_port)],
                         capture_output=True, text=True, timeout=300)
    assert "fsdp-ok" in out.stdout, out.stderr[-2000:]


# ---- FSDP2 with a frozen backbone over two processes ----------------------------------------------------


def _fsdp_hf_worker(rank: int, world: int, port: int, folder: str, out: str, hf_model) -> None:
    """Each rank: an unsharded reference on the whole batch and the FSDP2-sharded model on its half,
    two SGD steps; after each, greedy speculative decoding (after a forward, as in validation).
    ``hf_model`` is the conftest builder (a module-level function, so it pickles into the workers)."""
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mtp_lightning.objectives.cp_loss import cp_objective
    from mtp_lightning.data.packing import split_window
    from mtp_lightning.decoding import generate_speculative
    from mtp_lightning.training.distributed import prepare_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
        loss_cfg = LossConfig(balance="none", position_fraction=1.0)
        window = torch.randint(1, 300, (4, 12 + 3), generator=torch.Generator().manual_seed(1))
        half = window.shape[0] // world
        prompts = window[:2, :6].tolist()

        def sync_done(local_done: bool) -> bool:  # what the acceptance callback hands the decoder
            left = torch.tensor(0.0 if local_done else 1.0)
            dist.all_reduce(left)
            return float(left) == 0

        def grads(model, opt, w):
            model.eval()  # no dropout in the joint backbone: both models compute the same function
            # through the optimizer: while FSDP2 keeps the root unsharded (after the forward that comes
            # before decoding), model.parameters() are the unsharded tensors, not the ones the
            # optimizer steps (Lightning, too, zeroes through the optimizer)
            opt.zero_grad(set_to_none=True)
            inputs, targets = split_window(w, model.n_future)
            z, states = model(inputs)
            cp_objective(model.heads, z, states, model.unembedding, targets, loss_cfg).loss.backward()
            return {k: p.grad for k, p in model.named_parameters() if p.requires_grad}

        def decode(model):
            with torch.no_grad():
                model(window[:1, :8])  # a validation forward comes before the callback decodes
            return generate_speculative(model, prompts, 8, verifier="marginal", draft_len=2,
                                        sync_done=sync_done).tokens

        results = {}
        for kind, mode in (("mlp", "heads_only"), ("block", "heads_only"), ("mlp", "joint")):
            torch.manual_seed(0)
            model = hf_model(Path(folder), kind=kind, train_mode=mode, n_future=3, rank=2)
            ref = copy.deepcopy(model)
            base = {k: v.clone() for k, v in model.trunk.state_dict().items()}
            prepare_model(model, model.cfg, mesh)
            opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
                    for m in (ref, model)]
            worst, same_tokens = 0.0, []
            for _ in range(2):
                want = grads(ref, opts[0], window)
                got = grads(model, opts[1], window[rank * half:(rank + 1) * half])
                assert got.keys() == want.keys() and all(g is not None for g in got.values()), kind
                worst = max(worst, *((got[k].full_tensor() - want[k]).abs().max().item() for k in want))
                for opt in opts:
                    opt.step()
                same_tokens.append(decode(model) == decode(ref))
            trunk = {k: v.full_tensor() for k, v in model.trunk.state_dict().items()}
            results[f"{kind}-{mode}"] = {
                "worst": worst, "same_tokens": same_tokens,
                "trainable": sorted(k for k, p in model.named_parameters() if p.requires_grad),
                "backbone_unchanged": all(torch.equal(trunk[k], v) for k, v in base.items()),
            }
        if rank == 0:
            torch.save(results, out)
        dist.barrier()  # both ranks leave together, without the interpreter's teardown (see
        # tests/test_distributed.py's FSDP worker)
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_frozen_backbone_gives_full_batch_gradients_and_decodes(base_folder, hf_model, free_port, tmp_path):
    """FSDP2 over 2 gloo processes: the sharded heads get the full-batch gradients (also with ``mlp``
    heads, whose forward returns nothing that needs a gradient; GPT-2's U is tied to its embedding,
    Llama's is not), the frozen backbone stays as it was, and greedy speculative decoding after
    training steps is the unsharded model's, token for token."""
    import torch.multiprocessing as mp

    out = tmp_path / "result.pt"
    mp.start_processes(_fsdp_hf_worker, args=(2, free_port, str(base_folder), str(out), hf_model), nprocs=2,
                       join=True,
                       start_method="spawn")
    results = torch.load(out, weights_only=True)
    assert list(results) == ["mlp-heads_only", "block-heads_only", "mlp-joint"]
    for name, r in results.items():
        assert r["worst"] < 1e-5, (name, r["worst"])
        assert r["same_tokens"] == [True, True], name
        frozen = name.endswith("heads_only")
        assert r["backbone_unchanged"] == frozen, name
        assert all(k.startswith("heads.") for k in r["trainable"]) == frozen, name


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_with_a_frozen_backbone_fits_and_resumes(base_weights, fit_args, tiny_hf, tb_scalars, tmp_path):
    """``trainer.strategy=fsdp`` on 2 CPU processes, heads only, with the acceptance callback: the
    sharded checkpoint holds only the heads (and their optimizer state) and the base model's
    reference; ``--resume last`` continues the step count; the backbone stays bit-identical."""
    import os
    import subprocess

    import torch.distributed.checkpoint as dcp

    from mtp_lightning.checkpoints.io import META_KEY, load_for_inference, safe_load
    from mtp_lightning.training.distributed import is_sharded_checkpoint

    folder = tiny_hf(tmp_path / "gpt2", "gpt2")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def fit(steps: int, resume: bool) -> None:
        args = fit_args(folder, tmp_path / "runs", "fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
                        "trainer.strategy=fsdp", f"trainer.max_steps={steps}", "checkpoint.every_n_steps=2")
        if resume:
            args[1:1] = ["--resume", "last"]
        # a subprocess: Lightning's launcher for ModelParallelStrategy re-runs the command line
        proc = subprocess.run([sys.executable, "-m", "mtp_lightning", *args], cwd=root, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run = tmp_path / "runs" / "fsdp"
    path = run / "checkpoints" / "last.ckpt"
    fit(4, resume=False)
    first = safe_load(path)
    assert is_sharded_checkpoint(path) and first["global_step"] == 4
    fit(6, resume=True)
    ckpt = safe_load(path)
    assert ckpt["global_step"] == 6 and ckpt[META_KEY]["base_model"]["name_or_path"] == str(folder)
    assert ckpt[META_KEY]["config"]["trainer"]["strategy"] == "fsdp"
    # the shards hold the heads and their optimizer state only
    keys = list(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    assert all(k.startswith("state_dict.model.heads.") for k in keys if k.startswith("state_dict."))
    state = [k for k in keys if k.startswith("optimizer_0.state.")]
    assert state and all(k.startswith("optimizer_0.state.model.heads.") for k in state)
    step = {"optimizer_0.state.model.heads.draft_weight.step": torch.zeros(())}
    dcp.load(step, checkpoint_id=str(path), no_dist=True)
    assert float(step["optimizer_0.state.model.heads.draft_weight.step"]) == 6  # Adam's state came back, too
    assert not any(torch.equal(ckpt["state_dict"][k], v) for k, v in first["state_dict"].items())  # trained on
    model, _, _ = load_for_inference(path)
    trunk = model.trunk.lm.state_dict()
    assert all(torch.equal(trunk[k], v) for k, v in base_weights(folder).items())
    # the acceptance callback ran real speculative decoding at the validations before and after resuming
    tags = tb_scalars(run)
    for tag in ("spec/mean_acceptance_length", "spec/acceptance_rate", "spec/tf_mean_acceptance_length"):
        assert [step for step, _ in tags[tag]] == [3, 6], tag
    assert [step for step, _ in tags["train/loss"]][-1] == 6
