"""CP heads on a pretrained Hugging Face causal LM, offline: tiny random GPT-2 and Llama models saved to
a temporary folder with a locally trained tokenizer. Covers exactness (the adapter's logits, greedy
speculative output against ``model.generate``), the distillation term, heads-only and joint training,
checkpoints that omit the frozen backbone (save, resume, reload, bench), and the error messages. ddp and
FSDP2 on 2 CPU processes: ``test_hf_distributed.py``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mtp_lightning.cli import main  # noqa: E402
from mtp_lightning.config import HeadsConfig, LossConfig, ModelConfig, load_config  # noqa: E402
from mtp_lightning.objectives.distill import distill_objective, offset_weights  # noqa: E402
from mtp_lightning.errors import UserError  # noqa: E402

CONF = str(Path(__file__).resolve().parent.parent / "conf" / "finetune_code.yaml")


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the adapter ------------------------------------------------------------------------------------


def test_lm_head_verifier_is_the_base_model(hf_model, base_folder):
    model = hf_model(base_folder).eval()
    ids = torch.randint(1, 300, (2, 11))
    with torch.no_grad():
        want = model.trunk.lm(input_ids=ids).logits.log_softmax(-1)
        z, states = model(ids)
        got = model.verifier_logprobs(z, states, "lm_head")
    assert z.shape == (2, 11, 32) and len(states) == 4
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert model.unembedding is model.trunk.lm.get_output_embeddings().weight  # tied, not copied


def test_heads_only_backbone_is_frozen_and_stays_in_eval(hf_model, base_folder):
    model = hf_model(base_folder)
    assert not any(p.requires_grad for p in model.trunk.parameters())
    assert all(p.requires_grad for p in model.heads.parameters())
    model.train()
    assert not model.trunk.training and not model.trunk.lm.training and model.heads.training
    joint = hf_model(base_folder, train_mode="joint").train()
    assert joint.trunk.training and all(p.requires_grad for p in joint.trunk.parameters())


@pytest.mark.parametrize("kind", ["mlp", pytest.param("block", marks=pytest.mark.slow)])
def test_greedy_speculative_equals_hf_generate(greedy_parity, hf_model, base_folder, kind):
    """Token for token against ``model.generate(do_sample=False)`` of transformers, for every draft
    length, and against our own AR decoding per row and as a left-padded batch."""
    from mtp_lightning.decoding import generate_speculative

    model = hf_model(base_folder, kind=kind).eval()
    lm, eos = model.trunk.lm, model.trunk.lm.config.eos_token_id
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 300, (n,), generator=g).tolist() for n in (4, 9, 6)]
    for p in prompts:
        ids = torch.tensor([p])
        ref = lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                          eos_token_id=eos, pad_token_id=eos)[0, len(p):].tolist()
        for k in range(1, model.n_future):
            out = generate_speculative(model, [p], 20, verifier="lm_head", draft_len=k, eos_id=eos)
            assert out.tokens == [ref], f"k={k}, prompt {p}"
    accepted, drafted = greedy_parity(model, prompts, 12, verifiers=("lm_head",))
    assert 0 < drafted  # the batched path with holes in the HF cache ran
    if kind == "mlp" and "gpt2" in str(base_folder):
        assert 0 < accepted < drafted  # both the accept and the reject paths


def test_transformers_baseline_decodes_what_our_ar_decodes(hf_model, base_folder):
    """``bench.hf_greedy_baseline`` (the sweep's and the decoder benchmark's transformers reference) runs
    transformers' own greedy ``generate`` with eos off: exactly the project's AR tokens, all
    ``max_new_tokens`` of them, per prompt."""
    from mtp_lightning.decoding import generate_ar
    from mtp_lightning.decoding.bench import hf_greedy_baseline

    model = hf_model(base_folder).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 300, (n,), generator=g).tolist() for n in (5, 11)]
    result = hf_greedy_baseline(model, prompts, 14, pad_id=0)
    assert result["outputs"] == [generate_ar(model, [p], 14, verifier="lm_head").tokens[0] for p in prompts]
    assert [len(o) for o in result["outputs"]] == [14, 14]
    assert result["tokens_per_s"] == 28 / result["seconds"]


def test_eos_stops_where_hf_generate_stops(hf_model, base_folder):
    """With an eos id greedy decoding reaches (a token of the first prompt's continuation, where it first
    appears), AR and speculative decoding stop where ``generate(do_sample=False, eos_token_id=...)``
    does: per row, and in a batch whose rows end at different steps."""
    from mtp_lightning.decoding import generate_ar, generate_speculative

    model = hf_model(base_folder).eval()
    lm = model.trunk.lm
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 300, (n,), generator=g).tolist() for n in (5, 8, 3)]
    first = generate_ar(model, [prompts[0]], 16, verifier="lm_head").tokens[0]
    j = next(j for j in range(4, 16) if first[j] not in first[:j])
    eos = first[j]
    refs = []
    for p in prompts:
        ids = torch.tensor([p])
        refs.append(lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                                eos_token_id=eos, pad_token_id=eos)[0, len(p):].tolist())
    assert refs[0] == first[: j + 1]  # transformers stopped at the chosen eos
    assert len({len(r) for r in refs}) > 1  # rows of the batch end at different steps
    assert generate_ar(model, prompts, 16, verifier="lm_head", eos_id=eos).tokens == refs
    for k in range(1, model.n_future):
        assert generate_speculative(model, prompts, 16, verifier="lm_head", draft_len=k, eos_id=eos).tokens == refs
        for p, ref in zip(prompts, refs):
            assert generate_speculative(model, [p], 16, verifier="lm_head", draft_len=k, eos_id=eos).tokens == [ref]


# ---- distillation -------------------------------------------------------------------------------------


def test_distillation_is_zero_when_heads_equal_the_base():
    """Identity factor maps over a sequence whose hidden state never changes: every offset's marginal
    is softmax(U z), the base distribution at every position, so each KL is 0."""
    torch.manual_seed(0)
    D, V, n, r = 16, 40, 3, 2
    cfg = ModelConfig(heads=HeadsConfig(n_future=n, rank=r, kind="linear"))
    from mtp_lightning.config import GPTConfig
    from mtp_lightning.model.heads import CPHeads

    heads = CPHeads(cfg.heads, GPTConfig(d_model=D, n_head=2, vocab_size=V))
    with torch.no_grad():
        heads.next_weight.copy_(torch.eye(D).expand(r, D, D))
        heads.draft_weight.copy_(torch.eye(D).expand(n - 1, r, D, D))
    U = torch.randn(V, D)
    z = torch.randn(1, 1, D).expand(2, 7, D).contiguous()
    targets = torch.randint(0, V, (2, 7, n))
    for lean in (True, False):
        loss_cfg = LossConfig(distill_beta=1.0, chunk_size=5, lean=lean)
        terms = distill_objective(heads, z, [z] * n, U, z, lambda h: h @ U.T, targets, loss_cfg)
        torch.testing.assert_close(terms.kl, torch.zeros(n), rtol=0, atol=1e-6)
        assert float(terms.loss) < 1e-6
    # not zero once the base model disagrees, and the CE part is the marginal's NLL
    terms = distill_objective(heads, z, [z] * n, U, z, lambda h: 2 * h @ U.T, targets,
                              LossConfig(distill_beta=0.5))
    assert bool((terms.kl > 1e-3).all())
    nll = -(z[0, 0] @ U.T).log_softmax(-1)[targets]  # (2, 7, n)
    torch.testing.assert_close(terms.ce, torch.stack([nll[:, : 7 - s, s].mean() for s in range(n)]))
    w = offset_weights(n, 0.8)
    torch.testing.assert_close(terms.loss, (w * (0.5 * terms.kl + 0.5 * terms.ce)).sum())
    torch.testing.assert_close(w, torch.tensor([1.0, 0.8, 0.64]) / 2.44)


def test_distillation_offset1_is_zero_on_the_real_backbone(hf_model, base_folder):
    """Identity heads on the HF trunk: q_1 is the base model's own next-token distribution."""
    model = hf_model(base_folder, kind="linear", n_future=2, rank=2)
    with torch.no_grad():
        model.heads.next_weight.copy_(torch.eye(32).expand(2, 32, 32))
        model.heads.draft_weight.copy_(torch.eye(32).expand(1, 2, 32, 32))
    ids = torch.randint(1, 300, (2, 10))
    targets = torch.randint(1, 300, (2, 10, 2))
    z, states = model(ids)
    U = model.unembedding
    if "gpt2" in str(base_folder):  # GPT-2 ties U to its embedding: the output layer is exactly U z
        terms = distill_objective(model.heads, z, states, U, z, model.lm_logits, targets, LossConfig())
        assert abs(float(terms.kl[0])) < 1e-5 and float(terms.kl[1]) > 1e-3
    # the gradient reaches the heads only, through the checkpointed chunks
    terms = distill_objective(model.heads, z, states, U, z, model.lm_logits, targets,
                              LossConfig(chunk_size=7, distill_beta=0.5))
    terms.loss.backward()
    assert model.heads.next_weight.grad is not None and model.heads.draft_weight.grad is not None
    assert U.grad is None


# ---- training, checkpoints, decoding from them ---------------------------------------------------


@pytest.fixture(scope="module")
def heads_only_run(fit_args, tiny_hf, tmp_path_factory):
    folder = tiny_hf(tmp_path_factory.mktemp("gpt2_fit"), "gpt2")
    root = tmp_path_factory.mktemp("runs")
    assert main(fit_args(folder, root, "heads")) == 0
    return folder, root / "heads"


def test_heads_only_fit_keeps_backbone_bit_identical(base_weights, hf_model, tb_scalars, heads_only_run):
    from mtp_lightning.checkpoints.io import META_KEY, load_for_inference, safe_load

    folder, run = heads_only_run
    ckpt = safe_load(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 6
    assert not any(k.startswith("model.trunk.") for k in ckpt["state_dict"])  # only what changed
    assert ckpt[META_KEY]["base_model"]["name_or_path"] == str(folder)
    assert ckpt[META_KEY]["config"]["tokenizer"]["kind"] == "hub"  # the model's own tokenizer
    model, _, _ = load_for_inference(run / "checkpoints" / "last.ckpt")
    base = base_weights(folder)
    trunk = model.trunk.lm.state_dict()
    assert all(torch.equal(trunk[k], v) for k, v in base.items())
    fresh = hf_model(folder, n_future=3, rank=2)
    assert not torch.equal(model.heads.draft_weight, fresh.heads.draft_weight)  # the heads did train
    # only the heads have optimizer state
    n_opt = sum(len(g["params"]) for g in ckpt["optimizer_states"][0]["param_groups"])
    assert n_opt == len(list(model.heads.parameters()))
    # the acceptance callback measured real speculative decoding with the base model's own LM head

    tags = tb_scalars(run)
    assert "spec/mean_acceptance_length" in tags and "train/distill_kl" in tags


def test_verifier_bits_per_byte_is_the_base_model_s(tb_scalars, heads_only_run):
    """With the ``lm_head`` verifier, validation logs the bits per byte of the distribution decoding
    emits from (the frozen model's own LM head, the whole vocabulary): the base model's NLL on the
    validation windows over their bytes, the same at every validation since the backbone is frozen."""
    from mtp_lightning.checkpoints.io import load_for_inference
    from mtp_lightning.data import checkpoint_datamodule
    from mtp_lightning.data.packing import split_window
    from mtp_lightning.objectives.heldout import bits_per_byte

    _, run = heads_only_run
    model, tok, cfg = load_for_inference(run / "checkpoints" / "last.ckpt")
    dm = checkpoint_datamodule(cfg.data, cfg.tokenizer, model.n_future, cfg.run.seed, tok)
    window = next(iter(dm.val_dataloader()))  # trainer.limit_val_batches=1
    inputs, targets = split_window(window, model.n_future)
    with torch.no_grad():
        lp = model.lm_logits(model(inputs)[0]).log_softmax(-1)  # (B, T, V)
    nats = -lp.gather(-1, targets[..., :1]).sum()
    expected = bits_per_byte(nats, tok.token_bytes().float()[targets[..., 0]].sum()).item()
    logged = tb_scalars(run)["val/verifier_bits_per_byte"]
    assert [s for s, _ in logged] == [3, 6]
    assert all(v == pytest.approx(expected, rel=1e-5) for _, v in logged), (logged, expected)


def test_heads_only_resume_and_bench(fit_args, heads_only_run, capsys, tmp_path):
    folder, run = heads_only_run
    args = fit_args(folder, run.parent, run.name, "trainer.max_steps=9")
    assert main(["fit", "--resume", "last", *args[1:]]) == 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9
    out = tmp_path / "bench.json"
    code = main(["bench", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--n-prompts", "2",
                 "--prompt-len", "12", "--max-new-tokens", "12", "--json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and result["identical"] is True and result["verifier"] == "lm_head"
    h = result["histogram"]  # tau: the mean of (accepted + 1) over verification steps
    assert result["mean_acceptance_length"] == pytest.approx(sum((j + 1) * c for j, c in enumerate(h)) / sum(h))
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--prompt", "def f(x):",
                 "--max-new-tokens", "8", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 8
    assert main(["validate", "--ckpt", str(run / "checkpoints" / "last.ckpt")]) == 0
    assert "val/distill_kl" in capsys.readouterr().out


def test_changed_base_model_is_refused(tiny_hf, heads_only_run, tmp_path):
    from mtp_lightning.checkpoints.io import load_for_inference

    folder, run = heads_only_run
    other = tiny_hf(tmp_path / "other", "gpt2", seed=1)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["mtp_lightning"]["config"]["model"]["backbone"]["name_or_path"] = str(other)
    torch.save(ckpt, tmp_path / "moved.ckpt")
    with pytest.raises(UserError, match="differ from that model's"):
        load_for_inference(tmp_path / "moved.ckpt")


@pytest.mark.slow
def test_joint_fit_updates_the_backbone(base_weights, fit_args, tiny_hf, tmp_path):
    from mtp_lightning.checkpoints.io import load_for_inference, safe_load

    folder = tiny_hf(tmp_path / "llama", "llama")
    code = main(fit_args(folder, tmp_path / "runs", "joint", "model.backbone.train_mode=joint",
                         "optim.lr=1e-3", "optim.head_lr=3e-3", "model.loss.lm_head_weight=0.5",
                         "model.loss.distill_weight=0.5", "trainer.max_steps=4"))
    assert code == 0
    path = tmp_path / "runs" / "joint" / "checkpoints" / "last.ckpt"
    ckpt = safe_load(path)
    assert "base_model" not in ckpt["mtp_lightning"]  # the whole model is stored
    lrs = sorted({g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]})
    assert len(lrs) == 2  # the heads have their own learning rate
    model, _, _ = load_for_inference(path)
    trunk = model.trunk.lm.state_dict()
    changed = [k for k, v in base_weights(folder).items() if not torch.equal(trunk[k], v)]
    assert len(changed) > len(trunk) // 2


# ---- errors -----------------------------------------------------------------------------------------


def test_missing_transformers_is_one_clear_line(hf_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError, match=r"pip install 'mtp_lightning\[hf\]'"):
        hf_model(Path("unused"))


def test_unreachable_hub_id_is_one_clear_line(hf_model):
    with pytest.raises(UserError) as e:
        hf_model(Path("no-such-org/no-such-model"))
    msg = str(e.value)
    assert msg.startswith("model.backbone.name_or_path='no-such-org/no-such-model' (hub id) cannot be loaded as "
                          "a causal LM (") and "\n" not in msg
    assert msg.endswith("); give a folder written by save_pretrained or a reachable hub id")


def test_config_checks():
    with pytest.raises(UserError, match="distill_weight"):
        load_config(overrides=["model.loss.distill_weight=1.0"])
    with pytest.raises(UserError, match="nothing would be trained"):
        load_config(overrides=["model.backbone.kind=hf", "model.backbone.name_or_path=x",
                               "model.loss.joint_weight=0", "model.loss.lm_head_weight=0"])
    cfg = load_config([CONF])
    assert cfg.model.backbone.kind == "hf" and cfg.spec.verifier == "lm_head"
