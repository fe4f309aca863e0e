"""GGUF backbones, offline: a tiny random Llama written to GGUF by the gguf package (tests/gguf_fixture.py),
loaded through ``model.backbone.name_or_path=FILE.gguf``. Covers the loaded weights and tokenizer, greedy
speculative parity with transformers' ``generate``, sampled speculative decoding against the exact
distribution, a heads-only fit whose checkpoint refers to the file, and every error a user can meet
(one line, exit 2, nothing written into the run folder)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from mtp_lightning.cli import main  # noqa: E402
from mtp_lightning.config import BackboneConfig, HeadsConfig, ModelConfig  # noqa: E402
from mtp_lightning.errors import UserError  # noqa: E402
from mtp_lightning.model import gguf_backbone  # noqa: E402
from mtp_lightning.model.cp_model import CPModel  # noqa: E402

CONF = str(Path(__file__).resolve().parent.parent / "conf" / "finetune_code.yaml")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, gguf_writer):
    return gguf_writer(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


def gguf_model(path, n_future: int = 4, rank: int = 3) -> CPModel:
    cfg = ModelConfig(backbone=BackboneConfig(kind="hf", name_or_path=str(path)),
                      heads=HeadsConfig(n_future=n_future, rank=rank, kind="mlp"))
    return CPModel(cfg).eval()


# ---- loading --------------------------------------------------------------------------------------


def test_weights_and_tokenizer_come_from_the_file(tiny):
    path, weights, tok = tiny
    model = gguf_model(path)
    state = model.trunk.lm.state_dict()
    assert type(model.trunk.lm).__name__ == "LlamaForCausalLM"
    assert sorted(state) == sorted(weights)
    assert all(torch.equal(state[k], v) for k, v in weights.items())  # float32 tensors come back bit-exact
    assert model.trunk.gguf_file == str(path.resolve())
    assert model.unembedding is model.trunk.lm.get_output_embeddings().weight
    loaded = gguf_backbone.load_gguf_tokenizer(str(path))
    text = "def f(x):\n    return x + 1  # <|endoftext|> stays text\n"
    assert loaded.encode(text) == tok.encode(text)
    assert (loaded.eot_token, loaded.eot_id, loaded.vocab_size) == (tok.eot_token, tok.eot_id, tok.vocab_size)


def test_greedy_speculative_equals_transformers_generate(tiny):
    from mtp_lightning.decoding import generate_speculative

    model = gguf_model(tiny[0])
    lm = model.trunk.lm
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 380, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    refs = []
    for p in prompts:
        ids = torch.tensor([p])
        refs.append(lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                                eos_token_id=None, pad_token_id=0)[0, len(p):].tolist())
    for k in range(1, model.n_future):
        for p, ref in zip(prompts, refs):
            assert generate_speculative(model, [p], 16, verifier="lm_head", draft_len=k).tokens == [ref]
        batch = generate_speculative(model, prompts, 16, verifier="lm_head", draft_len=k)
        assert batch.tokens == refs, f"batch of 4, k={k}"


# ---- checkpoints ----------------------------------------------------------------------------------


def fit_args(path, root: Path, name: str, *extra: str) -> list[str]:
    return ["fit", "--config", CONF, f"model.backbone.name_or_path={path}", f"run.root={root}",
            f"run.name={name}", "trainer.progress_bar=false", "trainer.max_steps=2",
            "trainer.val_check_interval=2", "checkpoint.every_n_steps=2", "trainer.log_every_n_steps=1",
            "trainer.limit_val_batches=1", "trainer.precision=32-true", "data.seq_len=32",
            "data.batch_size=2", "data.max_bytes=100000", "model.heads.n_future=3", "model.heads.rank=2",
            "spec.n_prompts=1", "spec.prompt_len=8", "spec.max_new_tokens=6", "optim.warmup_steps=1", *extra]


def test_heads_only_checkpoint_refers_to_the_file(tiny, tmp_path, gguf_writer):
    from mtp_lightning.checkpoints.io import META_KEY, load_for_inference, safe_load

    path, weights, tok = tiny
    assert main(fit_args(path, tmp_path, "g")) == 0
    ckpt_path = tmp_path / "g" / "checkpoints" / "last.ckpt"
    ckpt = safe_load(ckpt_path)
    base = ckpt[META_KEY]["base_model"]
    assert base["name_or_path"] == str(path) and base["gguf_file"] == str(path.resolve())
    assert not any(k.startswith("model.trunk.") for k in ckpt["state_dict"])
    assert ckpt[META_KEY]["config"]["tokenizer"]["kind"] == "bpe"  # the model's own: the GGUF's
    model, loaded_tok, _ = load_for_inference(ckpt_path)
    assert loaded_tok.fingerprint() == gguf_backbone.load_gguf_tokenizer(str(path)).fingerprint()
    assert base["fingerprint"] == model.trunk.fingerprint()
    # a different file under the same name is refused by its fingerprint
    gguf_writer(path.parent / "other.gguf", seed=1)
    ckpt[META_KEY]["config"]["model"]["backbone"]["name_or_path"] = str(path.parent / "other.gguf")
    torch.save(ckpt, tmp_path / "moved.ckpt")
    with pytest.raises(UserError, match=r"differ from that model's \(trained on file"):
        load_for_inference(tmp_path / "moved.ckpt")


# ---- errors ---------------------------------------------------------------------------------------


def _truncated(tiny, tmp_path, keep: float) -> Path:
    data = tiny[0].read_bytes()
    out = tmp_path / f"cut{keep}.gguf"
    out.write_bytes(data[: int(len(data) * keep)])
    return out


@pytest.mark.parametrize("case", ["missing", "not_gguf", "cut_tensors", "cut_header", "architecture",
                                  "wheel_missing"])
def test_bad_files_are_one_clear_line(case, tiny, tmp_path, gguf_writer):
    if case == "missing":
        name, match = str(tmp_path / "nope.gguf"), r"GGUF file '.*nope.gguf' not found"
    elif case == "not_gguf":
        (tmp_path / "fake.gguf").write_text("not a model")
        name, match = str(tmp_path / "fake.gguf"), r"is not a GGUF file \(it starts with b'not '"
    elif case == "cut_tensors":
        name, match = str(_truncated(tiny, tmp_path, 0.9)), r"is a truncated (or corrupt )?GGUF file"
    elif case == "cut_header":
        name, match = str(_truncated(tiny, tmp_path, 0.01)), r"is a truncated or corrupt GGUF file"
    elif case == "architecture":
        name = str(gguf_writer(tmp_path / "bert.gguf", arch="bert")[0])
        match = r"cannot read architecture 'bert' from GGUF"
    else:
        name, match = "wheel:no_such_package_17", r"the Python package 'no_such_package_17' is not installed"
    with pytest.raises(UserError, match=match) as e:
        gguf_backbone.inspect_gguf(name)
    assert "\n" not in str(e.value)


def test_missing_gguf_package_is_one_clear_line(tiny, monkeypatch):
    gguf_backbone._inspect.cache_clear()
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(UserError, match=r"needs the gguf package: pip install 'mtp_lightning\[gguf\]'"):
        gguf_model(tiny[0])


@pytest.mark.parametrize("case", ["cut", "no_gguf_package"])
def test_fit_refuses_before_writing_anything(case, tiny, tmp_path, capsys, monkeypatch):
    """Through the command line: one line on stderr, exit 2, no run folder."""
    name, want = tiny[0], "needs the gguf package"
    if case == "cut":
        name, want = _truncated(tiny, tmp_path, 0.5), "is a truncated"
    else:
        gguf_backbone._inspect.cache_clear()
        monkeypatch.setitem(sys.modules, "gguf", None)
    capsys.readouterr()
    assert main(fit_args(name, tmp_path / "runs", "bad")) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and want in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_names_that_are_gguf():
    assert gguf_backbone.is_gguf("a/b/Model.Q4_K_M.GGUF") and gguf_backbone.is_gguf(gguf_backbone.SMOLLM2)
    assert not gguf_backbone.is_gguf("HuggingFaceTB/SmolLM2-135M") and not gguf_backbone.is_gguf("/models/llama")


# ---- sampling -------------------------------------------------------------------------------------

SAMPLE_PROMPT, DRAWS = [5, 77, 130], 10_000


def exact_two_token_distribution(model, prompt: list[int]) -> torch.Tensor:
    """P(y1, y2 | prompt) under the base model (its own LM head), flattened (V * V,): y1 * V + y2."""
    V = model.unembedding.shape[0]
    idx = torch.tensor([prompt + [y] for y in range(V)])  # (V, P + 1)
    with torch.no_grad():
        logp = model.trunk.lm(input_ids=idx).logits.float().log_softmax(-1)  # (V, P + 1, V)
    P = len(prompt)
    return (logp[0, P - 1][:, None] + logp[:, P]).exp().flatten()  # (V * V,)


def test_sampled_speculative_has_the_base_distribution(tmp_path, monkeypatch, gguf_writer, chi_square):
    """Temperature 1, no top-p: the first two tokens of 10,000 speculative draws (the second is a draft,
    accepted or replaced from the residual) follow the base model's exact joint distribution.

    A sharpened output layer makes the joint peaked (about 3 nats), so bins of >= 1% of the draws hold
    most of its mass. The test has power: it rejects a sampler 2% off in total variation (2% of the
    draws moved from the likeliest outcome to the second likeliest), simulated on the same bins, and a
    decoder that accepts every draft."""
    from mtp_lightning.decoding import Sampling, generate_speculative
    from mtp_lightning.decoding import speculative

    path = gguf_writer(tmp_path / "sharp.gguf", logit_scale=40.0)[0]
    model = gguf_model(path, n_future=3, rank=2)
    probs = exact_two_token_distribution(model, SAMPLE_PROMPT)
    V = model.unembedding.shape[0]

    def draws() -> torch.Tensor:
        gen = generate_speculative(model, [SAMPLE_PROMPT] * DRAWS, 3, verifier="lm_head", draft_len=2,
                                   sampling=Sampling(1.0), generator=torch.Generator().manual_seed(0))
        assert sum(map(sum, gen.drafted)) == DRAWS  # every row drafted its second token
        return torch.tensor([t[0] * V + t[1] for t in gen.tokens])

    min_expected = 0.01 * DRAWS
    stat, crit = chi_square(draws(), probs, min_expected)
    assert stat < crit, f"speculative sampling is off the base distribution: chi2={stat:.1f} > {crit:.1f}"
    top = probs.argsort(descending=True)[:2]
    off = probs.clone()
    off[top[0]] -= 0.02
    off[top[1]] += 0.02
    assert abs(0.5 * float((off - probs).abs().sum()) - 0.02) < 1e-6
    wrong = torch.multinomial(off, DRAWS, replacement=True, generator=torch.Generator().manual_seed(1))
    stat, crit = chi_square(wrong, probs, min_expected)
    assert stat > crit, f"a 2% total-variation error went unnoticed: chi2={stat:.1f} <= {crit:.1f}"
    monkeypatch.setattr(speculative, "acceptance_prob", lambda p, q: torch.ones_like(p))
    stat, crit = chi_square(draws(), probs, min_expected)
    assert stat > crit, f"a wrong acceptance rule went unnoticed: chi2={stat:.1f} <= {crit:.1f}"


def test_real_model_decoders_benchmark_runs(tiny):
    """benchmarks/real_model_decoders.py on the tiny GGUF Llama: the four decoders agree token for token."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "real_model_decoders", Path(__file__).resolve().parent.parent / "benchmarks" / "real_model_decoders.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path, _, tok = tiny
    model = gguf_model(path)
    prompts = [tok.encode("def f(x):\n    return x + 1\n\ndef f(x):\n"), tok.encode("import os\nimport sys\n")]
    results = bench.run(model, tok, prompts, 12, draft_len=0, lookup=4)
    assert list(results) == ["hf_greedy", "hf_prompt_lookup", "ar", "cp_spec"]
    assert all(r["identical_to_hf_greedy"] for r in results.values())
    assert results["hf_greedy"]["speedup"] == 1.0 and results["ar"]["tau"] == 1.0
    assert results["hf_prompt_lookup"]["tau"] >= 1.0 and results["cp_spec"]["tau"] >= 1.0
