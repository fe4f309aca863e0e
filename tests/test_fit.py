"""End to end: an in-process ``fit`` on the smoke preset, its run directory, TensorBoard, and resume."""

import contextlib
import gzip
import io
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from mtp_lightning.cli import main

CONF = str(Path(__file__).resolve().parent.parent / "conf" / "smoke.yaml")
FAST = ["trainer.progress_bar=false", "trainer.max_steps=12", "trainer.val_check_interval=6",
        "checkpoint.every_n_steps=6", "trainer.log_every_n_steps=2"]


@pytest.fixture(scope="module")
def smoke_fit(tmp_path_factory):
    """The smoke run's folder and what its fit printed."""
    root = tmp_path_factory.mktemp("runs")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["fit", "--config", CONF, f"run.root={root}", "run.name=smoke", *FAST])
    assert code == 0
    return root / "smoke", out.getvalue()


@pytest.fixture(scope="module")
def smoke_run(smoke_fit):
    return smoke_fit[0]


def test_fit_prints_a_preamble_and_a_summary(smoke_fit, tb_scalars):
    from mtp_lightning.data import Corpus, Tokenizer, split_documents

    run, printed = smoke_fit
    lines = printed.splitlines()
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    params = sum(v.numel() for k, v in saved["state_dict"].items() if k.startswith("model."))
    splits = split_documents(Corpus("stdlib", max_bytes=1_500_000).documents(), 0.05)
    train_bytes, val_text = sum(len(t.encode()) for t in splits["train"]), "".join(splits["val"]).encode()
    fingerprint = Tokenizer.from_json(saved["mtp_lightning"]["tokenizer"]).fingerprint()
    cache = Path(os.environ["MTP_LIGHTNING_CACHE"])
    (tokens,) = [m["tokens"] for m in (json.loads(p.read_text())["record"] for p in cache.glob("corpus-*/meta.json"))
                 if m["tokenizer"] == fingerprint and m["source"] == "stdlib"]
    assert lines[:6] == [
        f"corpus: stdlib (code): {train_bytes:,} train bytes ({tokens['train']:,} tokens), {len(val_text):,} "
        f"held-out bytes ({tokens['val']:,} tokens)",
        lines[1],  # trained here or loaded from the session's cache, checked below
        f"model: GPT 2 layers x d_model 64, 2 heads, context 96; CP heads n_future=3 rank=2 kind=mlp; "
        f"{params:,} parameters (all trainable)",
        "steps: 12 of batch 8 x 48 tokens, validation every 6, checkpoint every 6",
        "precision: 32-true (trainer.precision)",
        f"run: {run}",
    ]
    how = re.fullmatch(r"tokenizer: BPE (trained on the train split, cached at (.+)|loaded from the cache \((.+)\)); "
                       r"512 tokens", lines[1])
    tokenizer = Path(how.group(2) or how.group(3))
    assert tokenizer.parent == cache and Tokenizer.from_file(tokenizer).fingerprint() == fingerprint
    tags = tb_scalars(run)
    gzip_bpb = 8 * len(gzip.compress(val_text, 9)) / len(val_text)
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    last = run / "checkpoints" / "last.ckpt"
    # without the bar: a line every trainer.log_every_n_steps=2 optimizer steps, with the loss logged then
    progress = [re.fullmatch(r"step (\d+)/12: loss (\d+\.\d{3}), ([\d,]+) tok/s, ETA \d+:\d\d:\d\d", line)
                for line in lines[6:12]]
    assert all(progress), lines[6:12]
    assert [int(m.group(1)) for m in progress] == [2, 4, 6, 8, 10, 12]
    losses = dict(tags["train/loss"])
    assert [float(m.group(2)) for m in progress] == [round(losses[s], 3) for s in (2, 4, 6, 8, 10, 12)]
    assert lines[12:] == [
        f"run finished at step 12: {run}",
        f"held-out bits per byte: {tags['val/bits_per_byte'][-1][1]:.3f} at the last validation (gzip -9: "
        f"{gzip_bpb:.3f} on the held-out split)",
        lines[14],  # the acceptance and the speedup at step 12, checked below
        f"checkpoints: best {best}, last {last}",
        f"train further: python -m mtp_lightning fit --resume last run.root={run.parent} run.name=smoke "
        f"trainer.max_steps=24",
        f"TensorBoard: tensorboard --logdir {run / 'tensorboard'}",
    ]
    # the numbers the callback logged at the last validation (TensorBoard keeps float32: half a printed
    # unit of tolerance, plus float32's rounding)
    m = re.fullmatch(r"acceptance at the end of training: tau (\d+\.\d\d) tokens per step, acceptance rate "
                     r"(\d\.\d{3}) \(greedy, 2 held-out prompts\); speedup (\d+\.\d\d)x over AR \((\d+) against "
                     r"(\d+) tokens/s, batch 1, 2 held-out prompts, outputs identical\)", lines[14])
    assert m, lines[14]
    for group, tag, unit in [(1, "spec/mean_acceptance_length", 0.01), (2, "spec/acceptance_rate", 0.001),
                             (3, "spec/speedup", 0.01), (4, "spec/spec_tokens_per_s", 1),
                             (5, "spec/ar_tokens_per_s", 1)]:
        (step, value), = tags[tag][-1:]
        assert step == 12 and abs(float(m.group(group)) - value) <= unit / 2 + 1e-6 * value, tag
    assert tags["spec/identical"] == [(12, 1.0)]


def test_summary_says_when_the_speedup_was_not_measured(tmp_path):
    from types import SimpleNamespace

    from mtp_lightning.config import load_config
    from mtp_lightning.training.summary import summary_lines

    run = tmp_path / "r"
    dm = SimpleNamespace(gzip_bits_per_byte=lambda split: 2.5)
    tau = {"spec/mean_acceptance_length": torch.tensor(2.25), "spec/acceptance_rate": torch.tensor(0.5)}
    bench = f"measure it with: python -m mtp_lightning bench --ckpt {run / 'checkpoints' / 'last.ckpt'}"

    def acceptance_lines(overrides, metrics, world_size=1):
        trainer = SimpleNamespace(callback_metrics=metrics, global_step=7, checkpoint_callbacks=[],
                                  world_size=world_size)
        return summary_lines(load_config(overrides=overrides), trainer, dm, run)[2:-3]

    tail = "tau 2.25 tokens per step, acceptance rate 0.500 (greedy, 4 held-out prompts)"
    assert acceptance_lines(["spec.time_speedup=false"], tau) == [
        f"acceptance at the last validation: {tail}", f"speedup: not measured (spec.time_speedup=false); {bench}"]
    assert acceptance_lines([], tau, world_size=2) == [
        f"acceptance at the last validation: {tail}",
        f"speedup: not measured (2 processes; fit times it on one); {bench}"]
    assert acceptance_lines(["spec.every_n_val=0"], {}) == [f"speedup: not measured (spec.every_n_val=0); {bench}"]
    timed = {**tau, "spec/ar_tokens_per_s": torch.tensor(400.4, dtype=torch.float64),
             "spec/spec_tokens_per_s": torch.tensor(801.0, dtype=torch.float64),
             "spec/speedup": torch.tensor(801.0 / 400.4, dtype=torch.float64),
             "spec/identical": torch.tensor(0.0, dtype=torch.float64)}
    assert acceptance_lines(["spec.tree.enabled=true"], timed) == [
        f"acceptance at the end of training: {tail}; speedup 2.00x over AR (801 against 400 tokens/s, tree "
        f"verification, batch 1, 4 held-out prompts, outputs DIFFER from AR)"]


def test_run_directory_layout(smoke_run):
    assert (smoke_run / "config.yaml").is_file() and (smoke_run / "tokenizer.json").is_file()
    ckpts = sorted(p.name for p in (smoke_run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)
    assert list((smoke_run / "tensorboard").glob("events.out.tfevents.*"))
    saved = torch.load(smoke_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 12
    assert saved["mtp_lightning"]["config"]["model"]["heads"]["rank"] == 2


def test_tensorboard_has_every_metric(tb_scalars, smoke_run):
    tags = tb_scalars(smoke_run)
    expected = ["train/loss", "train/joint_nll_per_token", "train/next_token_nll", "train/balance_loss",
                "train/offset1_nll", "train/offset3_nll", "train/router_entropy", "train/dead_experts",
                "train/expert0_weight", "train/expert1_wins", "val/loss", "val/joint_nll_per_token",
                "val/next_token_nll", "val/ppl", "val/bits_per_byte", "val/offset2_nll",
                "train/device/items_per_sec", "spec/mean_acceptance_length", "spec/acceptance_rate",
                "spec/tf_mean_acceptance_length"]
    missing = [t for t in expected if t not in tags]
    assert not missing, missing
    assert any(t.startswith("lr-") for t in tags)
    assert "train/expert_use" in tags["__histograms__"]
    # perplexity and bits per byte describe the same NLL: bpb = ln(ppl) * tokens / bytes / ln 2, over the
    # targets of the validated windows (trainer.limit_val_batches=2 of the smoke preset)
    from mtp_lightning.checkpoints.io import load_for_inference
    from mtp_lightning.data import checkpoint_datamodule

    model, tok, cfg = load_for_inference(smoke_run / "checkpoints" / "last.ckpt")
    dm = checkpoint_datamodule(cfg.data, cfg.tokenizer, model.n_future, cfg.run.seed, tok)
    targets = torch.cat([w[:, 1:cfg.data.seq_len + 1] for _, w in zip(range(2), dm.val_dataloader())])  # (16, 48)
    n_bytes = int(tok.token_bytes()[targets].sum())
    ppl, bpb = tags["val/ppl"][-1][1], tags["val/bits_per_byte"][-1][1]
    assert bpb == pytest.approx(math.log(ppl) * targets.numel() / n_bytes / math.log(2), rel=1e-4)


def test_scalars_and_checkpoints_share_the_step(tb_scalars, smoke_fit):
    """Step N is the state after N optimizer steps: the N-th step's loss, a validation after it and the
    checkpoint it wrote (read before the resume test adds steps)."""
    run, _ = smoke_fit
    tags = tb_scalars(run)
    val = dict(tags["val/loss"])
    assert list(val) == [6, 12] and [s for s, _ in tags["spec/acceptance_rate"]] == [6, 12]
    assert [s for s, _ in tags["spec/speedup"]] == [12]  # timed at the last validation only
    assert [s for s, _ in tags["train/loss"]] == [2, 4, 6, 8, 10, 12]
    assert [s for s, _ in tags[next(t for t in tags if t.startswith("lr-"))]] == [2, 4, 6, 8, 10, 12]
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    assert best.name == f"best-step{min(val, key=val.get):07d}.ckpt"
    assert torch.load(best, weights_only=True)["global_step"] == min(val, key=val.get)


def test_resume_continues_steps_and_curves(tb_scalars, smoke_run, capsys):
    """Also --quiet: the resumed fit prints nothing (no preamble, bar or summary)."""
    code = main(["fit", "--quiet", "--config", CONF, "--resume", "last", f"run.root={smoke_run.parent}", "run.name=smoke",
                 *FAST[:-3], "trainer.max_steps=18", "trainer.val_check_interval=6", "checkpoint.every_n_steps=6",
                 "trainer.log_every_n_steps=2"])
    assert code == 0 and capsys.readouterr().out == ""
    saved = torch.load(smoke_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 18
    steps = [s for s, _ in tb_scalars(smoke_run)["train/loss"]]
    assert steps == sorted(steps) and steps[-1] == 18 and len(steps) == len(set(steps))


def test_accumulation_counts_optimizer_steps(tmp_path, tb_scalars, capsys):
    """trainer.val_check_interval, checkpoint.every_n_steps and the progress lines count optimizer steps,
    each of trainer.accumulate_grad_batches=2 batches; the validations and checkpoints carry the same steps."""
    args = ["fit", "--config", CONF, f"run.root={tmp_path}", "run.name=acc", *FAST[:1],
            "trainer.max_steps=6", "trainer.val_check_interval=3", "checkpoint.every_n_steps=3",
            "trainer.log_every_n_steps=1", "trainer.accumulate_grad_batches=2", "checkpoint.save_top_k=-1",
            "trainer.limit_val_batches=1", "spec.every_n_val=0", "data.batch_size=2", "data.seq_len=16"]
    assert main(args) == 0
    progress = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert progress == [f"step {s}/6" for s in range(1, 7)]
    run = tmp_path / "acc"
    assert [s for s, _ in tb_scalars(run)["val/loss"]] == [3, 6]
    best = sorted(p.name for p in (run / "checkpoints").glob("best-*.ckpt"))
    assert best == ["best-step0000003.ckpt", "best-step0000006.ckpt"]
    assert [torch.load(run / "checkpoints" / n, weights_only=True)["global_step"] for n in best] == [3, 6]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_last_checkpoint_knows_the_best_files_on_disk(smoke_run):
    """last.ckpt records the best checkpoints as they are after that step's validation, so a resumed
    run deletes the right file when a better one comes (it once recorded the state from before it)."""
    saved = torch.load(smoke_run / "checkpoints" / "last.ckpt", weights_only=True)
    best = next(v for k, v in saved["callbacks"].items() if "val/loss" in k)
    on_disk = {p.name for p in (smoke_run / "checkpoints").glob("best-*.ckpt")}
    assert {Path(p).name for p in best["best_k_models"]} == on_disk and len(on_disk) == 1


def test_existing_run_is_not_overwritten(smoke_run, capsys):
    before = sorted((p.name, p.stat().st_mtime) for p in (smoke_run / "checkpoints").iterdir())
    code = main(["fit", "--config", CONF, f"run.root={smoke_run.parent}", "run.name=smoke", *FAST])
    assert code == 2
    err = capsys.readouterr().err
    assert "run 'smoke' already exists" in err and "--resume last" in err
    assert sorted((p.name, p.stat().st_mtime) for p in (smoke_run / "checkpoints").iterdir()) == before


def test_validate_and_test_commands(smoke_run, capsys):
    ckpt = str(smoke_run / "checkpoints" / "last.ckpt")
    for command, prefix in (("validate", "val/"), ("test", "test/")):
        assert main([command, "--ckpt", ckpt, "trainer.progress_bar=false", "trainer.limit_val_batches=2"]) == 0
        out = capsys.readouterr().out
        assert f"{prefix}bits_per_byte" in out and f"{prefix}next_token_nll" in out


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    code = main(["fit", "--config", CONF, "--resume", "last", f"run.root={tmp_path}", "run.name=ghost"])
    assert code == 2
    assert "nothing to resume: run 'ghost' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "ghost").exists()


def test_print_config_applies_overrides(capsys):
    assert main(["fit", "--config", CONF, "--print-config", "model.heads.rank=7"]) == 0
    out = capsys.readouterr().out
    assert "rank: 7" in out and "n_future: 3" in out


def test_trained_model_speculative_equals_autoregressive(greedy_parity, smoke_run):
    from mtp_lightning.checkpoints.io import load_for_inference

    model, tok, _ = load_for_inference(smoke_run / "checkpoints" / "last.ckpt")
    prompts = [tok.encode(t) for t in ("def main():\n    ", "import os\n", "class Foo(object):\n    def ")]
    accepted, drafted = greedy_parity(model, prompts, max_new_tokens=20)
    assert drafted > 0


def test_generate_and_bench_commands(smoke_run, capsys, tmp_path):
    import json

    ckpt = str(smoke_run / "checkpoints" / "last.ckpt")
    for mode in ("ar", "spec"):
        assert main(["generate", "--ckpt", ckpt, "--prompt", "def f(x):", "--max-new-tokens", "10",
                     "--mode", mode, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["mode"] == mode and len(out["tokens"]) == 10
        assert set(out) >= {"text", "tokens", "tokens_per_s", "acceptance_rate", "mean_acceptance_length",
                            "per_position"}
        if mode == "ar":
            ar_tokens = out["tokens"]
        else:
            assert out["tokens"] == ar_tokens  # greedy: identical output
            assert len(out["per_position"]) == 2
    out_json = tmp_path / "bench.json"
    assert main(["bench", "--ckpt", ckpt, "--n-prompts", "2", "--prompt-len", "16", "--max-new-tokens", "12",
                 "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["identical"] is True
    assert set(result) >= {"ar_tokens_per_s", "spec_tokens_per_s", "speedup", "mean_acceptance_length",
                           "acceptance_rate", "per_position", "identical", "val_bits_per_byte"}
    assert out_json.with_suffix(".png").stat().st_size > 1000
    # tau is the mean of (accepted + 1) over verification steps: the histogram of accepted drafts gives it
    h = result["histogram"]
    assert result["mean_acceptance_length"] == pytest.approx(sum((j + 1) * c for j, c in enumerate(h)) / sum(h))
    assert set(result["machine"]) == {"cpu", "cpu_flags", "cores", "threads", "torch", "python",
                                      "load_average_1min", "gpu"}


def test_bench_defaults_are_clipped_to_the_context_and_explicit_values_refused(smoke_run, capsys):
    ckpt = str(smoke_run / "checkpoints" / "last.ckpt")
    capsys.readouterr()
    # the smoke model's context is 96 tokens with n_future 3: 93 for the prompt and the new tokens
    assert main(["bench", "--ckpt", ckpt, "--n-prompts", "1"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["bench: --prompt-len 64 (the default) clipped to 46 to fit this model's context of 96 tokens "
                   "(n_future 3)",
                   "bench: --max-new-tokens 128 (the default) clipped to 47 to fit this model's context of 96 "
                   "tokens (n_future 3)"]
    # a value given explicitly is kept, and only the other default gives way
    assert main(["bench", "--ckpt", ckpt, "--n-prompts", "1", "--prompt-len", "80"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "bench: --max-new-tokens 128 (the default) clipped to 13 to fit this model's context of 96 tokens "
        "(n_future 3)"]
    assert main(["bench", "--ckpt", ckpt, "--prompt-len", "64", "--max-new-tokens", "48"]) == 2
    assert capsys.readouterr().err == ("error: --prompt-len 64 + --max-new-tokens 48 exceeds this model's context "
                                       "of 96 tokens; lower one of them\n")


def test_generate_and_bench_stop_at_the_end_of_text_token(smoke_run, capsys, tmp_path):
    """The CLI stops at the tokenizer's end-of-text token by default. The smoke model only repeats
    spaces, so its checkpoint gets random weights (embeddings scaled up, as tests/test_decoding.py's
    tiny models, so greedy text varies), then the (tied) embedding rows of eot and of a token of its
    greedy continuation are swapped: that copy's greedy text is the same, with eot where that token was."""
    import json

    from mtp_lightning.checkpoints.io import load_for_inference

    ckpt = smoke_run / "checkpoints" / "last.ckpt"
    model, tok, _ = load_for_inference(ckpt)
    torch.manual_seed(0)
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    with torch.no_grad():
        model.trunk.wte.weight.mul_(3.0)
        model.trunk.wpe.weight.mul_(10.0)
    saved = torch.load(ckpt, weights_only=True)
    saved["state_dict"].update({f"model.{k}": v.clone() for k, v in model.state_dict().items()})
    random_ckpt = tmp_path / "random.ckpt"
    torch.save(saved, random_ckpt)
    prompt = "def f(x):"
    assert main(["generate", "--ckpt", str(random_ckpt), "--prompt", prompt, "--max-new-tokens", "20", "--mode",
                 "ar", "--json"]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    eot, prompt_ids = tok.eot_id, tok.encode(prompt)
    assert len(tokens) == 20 and eot not in tokens
    j = next(j for j in range(3, 20) if tokens[j] not in tokens[:j] and tokens[j] not in prompt_ids)
    wte = saved["state_dict"]["model.trunk.wte.weight"]
    wte[[eot, tokens[j]]] = wte[[tokens[j], eot]]
    swapped = tmp_path / "swapped.ckpt"
    torch.save(saved, swapped)
    for mode in ("ar", "spec"):
        assert main(["generate", "--ckpt", str(swapped), "--prompt", prompt, "--max-new-tokens", "20", "--mode",
                     mode, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["tokens"] == tokens[:j] + [eot] and out["stop"] == "eos"
        assert out["text"] == tok.decode(tokens[:j])  # the eot ends the text, it is not part of it
        assert main(["generate", "--ckpt", str(swapped), "--prompt", prompt, "--max-new-tokens", "20", "--mode",
                     mode, "--json", "--ignore-eos"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert len(out["tokens"]) == 20 and out["tokens"][j] == eot and out["stop"] == "max_new_tokens"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(prompt + "\n")
    bench_json = tmp_path / "bench.json"
    assert main(["bench", "--ckpt", str(swapped), "--prompts", str(prompts), "--max-new-tokens", "20",
                 "--repeats", "2", "--json", str(bench_json)]) == 0
    result = json.loads(bench_json.read_text())
    assert result["identical"] is True and result["eos_id"] == eot and result["generated_tokens"] == j + 1
    assert result["repeats"] == 2 and len(result["ar_seconds"]) == len(result["spec_seconds"]) == 2


def test_tree_options_of_generate_and_bench(smoke_run, capsys, tmp_path):
    import json

    ckpt = str(smoke_run / "checkpoints" / "last.ckpt")
    assert main(["generate", "--ckpt", ckpt, "--prompt", "def f(x):", "--max-new-tokens", "10", "--mode", "ar",
                 "--json"]) == 0
    ar_tokens = json.loads(capsys.readouterr().out)["tokens"]
    assert main(["generate", "--ckpt", ckpt, "--prompt", "def f(x):", "--max-new-tokens", "10", "--tree",
                 "--tree-width", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == ar_tokens
    assert set(out["tree"]) == {"mean_size", "max_size", "winners"}
    assert set(out["tree"]["winners"]) == {"none", "mixture", "expert0", "expert1", "topk"}
    # sampled trees: reproducible with --seed, their sources named as sampled trees name them
    sampled = []
    for seed in ("3", "3"):
        assert main(["generate", "--ckpt", ckpt, "--prompt", "def f(x):", "--max-new-tokens", "10", "--tree",
                     "--temperature", "1", "--top-k", "20", "--seed", seed, "--json"]) == 0
        sampled.append(json.loads(capsys.readouterr().out))
    assert sampled[0]["tokens"] == sampled[1]["tokens"] and len(sampled[0]["tokens"]) >= 1
    assert set(sampled[0]["tree"]["winners"]) == {"none", "mixture", "chain1", "chain2", "branch"}
    out_json = tmp_path / "bench.json"
    assert main(["bench", "--ckpt", ckpt, "--n-prompts", "2", "--prompt-len", "16", "--max-new-tokens", "12",
                 "--tree", "--tree-budget", "6", "--sampled", "--temperature", "0.8", "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["identical"] is True and result["tree_identical"] is True
    assert result["tree_budget"] == 6 and 0 < result["tree_max_size"] <= 6
    assert sum(result["tree_winners"].values()) == sum(result["tree_histogram"])
    assert result["sampled_temperature"] == 0.8 and 1 <= result["tree_sampled_mean_acceptance_length"] <= 3
    assert sum(result["tree_sampled_winners"].values()) == sum(result["tree_sampled_histogram"])
    capsys.readouterr()
    assert main(["bench", "--ckpt", ckpt, "--tree", "--tree-width", "0"]) == 2
    assert capsys.readouterr().err.strip().endswith("--tree-width=0 must be >= 1 (1 adds no branch beyond the chains)")
    assert main(["bench", "--ckpt", ckpt, "--sampled", "--temperature", "0"]) == 2
    assert "--temperature=0.0 must be > 0" in capsys.readouterr().err


def test_progress_line_format():
    from mtp_lightning.callbacks.progress import format_eta, progress_line

    assert progress_line(4, 12, 5.12345, 1234.4, 12.4) == "step 4/12: loss 5.123, 1,234 tok/s, ETA 0:00:12"
    assert progress_line(1, 500, None, 0.0, 3725.4) == "step 1/500: loss -, 0 tok/s, ETA 1:02:05"
    assert (progress_line(9, 12, 1.23449, 0.0, 3.2, draft_tuning=True)
            == "step 9/12: draft tuning, draft NLL 1.234 per token, ETA 0:00:03")
    assert format_eta(59.6) == "0:01:00"
