"""Strategies, sharding and their checkpoints, on CPU.

Fast: the refused combinations (and fsdp with a pretrained backbone, no longer one); activation
checkpointing that leaves names and gradients unchanged;
sharded checkpoints read back in one process; FSDP2 per-block sharding over 2 gloo processes giving the
full-batch gradients (the tied unembedding is used by the loss outside the root's forward).
Slow (``-m slow``): real ``fit`` runs of the smoke preset under ``ddp`` and ``fsdp`` on 2 processes,
checked against one process on the same global batch, resumed with ``--resume last``, with the
speculative-acceptance callback on; and 2-process fits with checkpointing, compile, bf16 and ddp_spawn.
Fits run as subprocesses (Lightning's DDP launcher re-runs the command line) with a timeout, so a
hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mtp_lightning.checkpoints.io import META_KEY, find_resume_checkpoint, safe_load
from mtp_lightning.cli import main
from mtp_lightning.config import LossConfig, load_config
from mtp_lightning.objectives.cp_loss import cp_objective
from mtp_lightning.data.packing import split_window
from mtp_lightning.training.distributed import check_parallel_config, is_sharded_checkpoint, prepare_model
from mtp_lightning.errors import UserError
from mtp_lightning.model.cp_model import CPModel

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf" / "smoke.yaml")
# the loss terms that are per-position means: with them, 2 ranks x B is the same objective as 1 x 2B
# (a balancing loss is a statistic of each rank's own positions, so it differs slightly across ranks)
EXACT = ["model.loss.balance=none", "model.loss.position_fraction=1.0", "model.loss.next_token_weight=1.0",
         "model.loss.lm_head_weight=0.0"]


def tiny(kind: str = "mlp", **loss) -> tuple[CPModel, LossConfig]:
    cfg = load_config(overrides=["model.gpt.n_layer=2", "model.gpt.d_model=16", "model.gpt.n_head=2",
                                 "model.gpt.max_seq_len=32", "data.seq_len=12", "model.heads.n_future=3",
                                 "model.heads.rank=2", f"model.heads.kind={kind}", "spec.every_n_val=0"])
    cfg.model.gpt.vocab_size = 40
    torch.manual_seed(0)
    return CPModel(cfg.model), LossConfig(balance="none", position_fraction=1.0, **loss)


def grads_of(model: CPModel, window: torch.Tensor, loss_cfg: LossConfig) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    inputs, targets = split_window(window, model.n_future)
    z, states = model(inputs)
    cp_objective(model.heads, z, states, model.unembedding, targets, loss_cfg).loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


# ---- refused up front ---------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["trainer.strategy=fsdp", "trainer.precision=16-mixed"], "16-mixed needs a GPU"),
    (["trainer.strategy=fsdp", "model.compile=true", "model.backbone.kind=hf",
      "model.backbone.name_or_path=x"], "model.compile=true with model.backbone.kind=hf"),
    (["model.activation_checkpointing=true", "model.compile=true", "model.backbone.kind=hf",
      "model.backbone.name_or_path=x"], "model.activation_checkpointing=true and model.compile=true with"),
])
def test_refused_combinations_are_one_line(tmp_path, capsys, overrides, message):
    code = main(["fit", "--config", CONF, f"run.root={tmp_path}", "trainer.accelerator=cpu", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err
    assert not (tmp_path / "smoke").exists()


def test_fsdp_refuses_fp16_on_gpus_too():
    cfg = load_config([CONF], ["trainer.strategy=fsdp", "trainer.precision=16-mixed"])
    with pytest.raises(UserError, match="ModelParallelStrategy .FSDP2. has no fp16 loss scaling"):
        check_parallel_config(cfg)


def test_fsdp_takes_a_pretrained_backbone():
    """fsdp with model.backbone.kind=hf is sharded per decoder layer (hf_backbone.shard_frozen_backbone);
    only checkpointing and compile, which wrap the gpt trunk's blocks, are still refused with it."""
    hf = ["trainer.strategy=fsdp", "model.backbone.kind=hf", "model.backbone.name_or_path=x"]
    for mode in ("heads_only", "joint"):
        check_parallel_config(load_config([CONF], [*hf, f"model.backbone.train_mode={mode}"]))
    for option in ("model.activation_checkpointing=true", "model.compile=true"):
        with pytest.raises(UserError, match=f"^unsupported combination: {option} with model.backbone.kind=hf"):
            check_parallel_config(load_config([CONF], [*hf, option]))


@pytest.mark.parametrize("sharded", [True, False])
def test_resume_keeps_the_checkpoint_format_of_its_strategy(tmp_path, capsys, sharded):
    ckpt = tmp_path / "smoke" / "checkpoints" / "last.ckpt"
    if sharded:
        write_sharded_checkpoint(ckpt)
    else:
        ckpt.parent.mkdir(parents=True)
        torch.save({"state_dict": {}, META_KEY: {"format": 1, "code_version": "x", "config": {}, "tokenizer": "{}"}},
                   ckpt)
    strategy = "ddp" if sharded else "fsdp"
    code = main(["fit", "--config", CONF, "--resume", "last", f"run.root={tmp_path}", f"trainer.strategy={strategy}"])
    err = capsys.readouterr().err
    assert code == 2
    assert ("a sharded checkpoint" if sharded else "a single-file checkpoint") in err and "\n" not in err.strip()


# ---- one process ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mlp", "block"])
def test_activation_checkpointing_keeps_names_gradients_and_decoding(kind):
    model, loss_cfg = tiny(kind)
    window = torch.randint(0, 40, (3, 12 + 3), generator=torch.Generator().manual_seed(1))
    expected = grads_of(model, window, loss_cfg)
    names = list(model.state_dict())
    prepare_model(model, load_config(overrides=["model.activation_checkpointing=true"]).model)
    assert list(model.state_dict()) == names
    got = grads_of(model, window, loss_cfg)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-7, msg=k)
    # a deep copy (EMA, SWA) gets its own forward, bound to its own weights
    twin = copy.deepcopy(model)
    assert twin.trunk.blocks[0].forward.__self__ is twin.trunk.blocks[0]
    for k, g in grads_of(twin, window, loss_cfg).items():
        torch.testing.assert_close(g, expected[k], rtol=1e-5, atol=1e-7, msg=k)
    # decoding (a KV cache) runs the eager forward and still matches the full forward
    model.eval()
    with torch.no_grad():
        cache = model.new_cache(2, 16)
        z_cached, _ = model.extend(window[:2, :6], cache)
        z_full, _ = model(window[:2, :6])
    torch.testing.assert_close(z_cached, z_full, rtol=1e-5, atol=1e-6)


def write_sharded_checkpoint(folder: Path, step: int = 7) -> dict:
    """What ModelParallelStrategy writes, made in one process: shards of the state dict and meta.pt."""
    import torch.distributed.checkpoint as dcp

    model, _ = tiny()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    folder.mkdir(parents=True)
    dcp.save({"state_dict": state}, checkpoint_id=str(folder), no_dist=True)
    meta = {"global_step": step, META_KEY: {"format": 1, "code_version": "x", "config": {}, "tokenizer": "{}"}}
    torch.save(meta, folder / "meta.pt")
    return state


def test_sharded_checkpoint_reads_back_in_one_process(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    state = write_sharded_checkpoint(checkpoints / "last.ckpt")
    assert is_sharded_checkpoint(checkpoints / "last.ckpt")
    ckpt = safe_load(checkpoints / "last.ckpt")
    assert ckpt["global_step"] == 7 and ckpt[META_KEY]["tokenizer"] == "{}"
    assert ckpt["state_dict"].keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(ckpt["state_dict"][k], v), k
    assert find_resume_checkpoint(tmp_path / "run") == checkpoints / "last.ckpt"
    # a lost shard is one clear error, and --resume last falls back to the newest readable checkpoint
    write_sharded_checkpoint(checkpoints / "step0000004.ckpt", step=4)
    for shard in (checkpoints / "last.ckpt").glob("*.distcp"):
        shard.unlink()
    with pytest.raises(UserError, match="cannot be read"):
        safe_load(checkpoints / "last.ckpt")
    assert find_resume_checkpoint(tmp_path / "run") == checkpoints / "step0000004.ckpt"


# ---- FSDP2 over two processes -------------------------------------------------------------------------

def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
        results = {}
        for kind in ("mlp", "block"):  # block heads are transformer layers, sharded like the trunk's
            model, loss_cfg = tiny(kind, next_token_weight=0.5)
            window = torch.randint(0, 40, (4, 12 + 3), generator=torch.Generator().manual_seed(1))
            expected = grads_of(model, window, loss_cfg)  # one process, the whole batch
            prepare_model(model, load_config(overrides=["model.activation_checkpointing=true"]).model, mesh)
            half = window.shape[0] // world
            got = grads_of(model, window[rank * half:(rank + 1) * half], loss_cfg)  # this rank's half
            worst = max((got[k].full_tensor() - expected[k]).abs().max().item() for k in expected)
            # decoding after a forward: the root stays unsharded, each block gathers its own weights
            with torch.no_grad():
                model(window[:1, :4])
                z, _ = model.extend(window[:1, :4], model.new_cache(1, 16))
            results[kind] = {"worst": worst, "names": sorted(got), "z": z}
        if rank == 0:
            torch.save(results, out)
        # both ranks leave together, then skip the interpreter's teardown: gloo's threads, still owned by
        # the device mesh there, once aborted a rank at exit ("terminate called without an active
        # exception") after every result was in
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.distributed
def test_fsdp2_per_block_sharding_gives_full_batch_gradients(tmp_path, free_port):
    out = str(tmp_path / "result.pt")
    mp.start_processes(_fsdp_worker, args=(2, free_port, out), nprocs=2, join=True, start_method="spawn")
    results = torch.load(out, weights_only=True)
    for kind, result in results.items():
        model, _ = tiny(kind)
        assert result["names"] == sorted(n for n, _ in model.named_parameters()), kind
        assert result["worst"] < 1e-6, (kind, result["worst"])
        assert result["z"].shape == (1, 4, 16) and torch.isfinite(result["z"]).all(), kind


# ---- real fits on two processes ------------------------------------------------------------------------

def fit_cli(root: Path, name: str, *overrides: str, resume: bool = False) -> None:
    """``python -m mtp_lightning fit`` in a subprocess (Lightning's DDP launcher re-runs the command)."""
    cmd = [sys.executable, "-m", "mtp_lightning", "fit", "--config", CONF, f"run.root={root}", f"run.name={name}",
           "trainer.accelerator=cpu", "trainer.progress_bar=false", *EXACT, *overrides]
    if resume:
        cmd[4:4] = ["--resume", "last"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def val_losses(run: Path) -> tuple[list[tuple[int, float]], list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars("val/loss")], ea.Tags()["scalars"]


STEPS = ["trainer.val_check_interval=2", "checkpoint.every_n_steps=2", "trainer.log_every_n_steps=1"]
# the last 2 of 6 steps are draft tuning: 8 continuations, all of them in each global batch. They are
# sampled (greedy text would be the same on every rank anyway): each rank draws its own pool from the
# seed, and only one pool on all ranks gives the single process's weights
DRAFT = ["draft_tuning.steps=2", "draft_tuning.sequences=8", "draft_tuning.prompt_len=8",
         "draft_tuning.new_tokens=8", "draft_tuning.temperature=1.0"]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    """One process, batch 2B = 16, four steps and two of draft tuning: the reference for 2 processes x B = 8."""
    root = tmp_path_factory.mktemp("single")
    # validation sees the same 16 windows as the 2-process runs (2 batches of 8 there, 1 of 16 here)
    fit_cli(root, "ref", "data.batch_size=16", "trainer.limit_val_batches=1", "trainer.max_steps=4", *STEPS,
            *DRAFT, "draft_tuning.batch_size=8")
    return root / "ref"


@pytest.mark.distributed  # not slow-marked: CI runs it (~80 s for both strategies and the reference)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_fit_resume_matches_single_process(tmp_path, single_process_run, strategy):
    common = [f"trainer.strategy={strategy}", "trainer.devices=2", "data.batch_size=8", "trainer.limit_val_batches=2",
              *STEPS]
    fit_cli(tmp_path, "multi", "trainer.max_steps=4", *common)
    last = tmp_path / "multi" / "checkpoints" / "last.ckpt"
    assert last.is_dir() == (strategy == "fsdp") and is_sharded_checkpoint(last) == (strategy == "fsdp")
    assert safe_load(last)["global_step"] == 4
    # resumed into draft tuning: DDP must accept the parameters without gradients, every rank rebuilds
    # the same pool, and each takes half of every global batch
    fit_cli(tmp_path, "multi", "trainer.max_steps=4", *common, *DRAFT, "draft_tuning.batch_size=4", resume=True)
    multi = safe_load(last)
    ref = safe_load(single_process_run / "checkpoints" / "last.ckpt")
    assert multi["global_step"] == ref["global_step"] == 6
    assert multi[META_KEY]["config"]["trainer"]["strategy"] == strategy
    # weights after 4 steps, a resume and 2 of draft tuning: the same as one process on the same batches
    for k, v in ref["state_dict"].items():
        torch.testing.assert_close(multi["state_dict"][k], v, rtol=0, atol=1e-5, msg=k)
    (ref_val, _), (multi_val, tags) = val_losses(single_process_run), val_losses(tmp_path / "multi")
    assert [s for s, _ in multi_val] == [s for s, _ in ref_val] == [2, 4, 6]
    for (_, a), (_, b) in zip(multi_val, ref_val):
        assert a == pytest.approx(b, rel=1e-5)
    # the speculative-acceptance callback ran at each validation on both ranks (no deadlock)
    assert "spec/mean_acceptance_length" in tags and "spec/acceptance_rate" in tags


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("options", [
    ["trainer.strategy=fsdp", "model.activation_checkpointing=true", "model.compile=true",
     "trainer.precision=bf16-mixed"],
    ["trainer.strategy=ddp_spawn", "model.activation_checkpointing=true", "model.heads.kind=block"],
], ids=["fsdp-checkpointing-compile-bf16", "ddp_spawn-checkpointing-block-heads"])
def test_two_process_fit_with_options(tmp_path, options):
    fit_cli(tmp_path, "opts", "trainer.devices=2", "trainer.max_steps=2", *STEPS, *options)
    ckpt = safe_load(tmp_path / "opts" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
