"""Every bad input in docs/errors.md: one line on stderr, exit code 2, no traceback, nothing half-made.

Each case is (id, argv, expected fragment). ``{tmp}`` is a scratch folder holding the fixtures below;
``{runs}`` is an empty run root that must stay empty.
"""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtp_lightning.cli import main

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "conf" / "smoke.yaml")
FIT = ["fit", "--config", SMOKE, "trainer.progress_bar=false"]

CASES = [
    ("E01 unknown key", [*FIT, "trainer.max_stpes=5"], "unknown config key 'trainer.max_stpes' in the command line "
                                                      "(did you mean 'trainer.max_steps'?)"),
    ("E02 unknown key in YAML", ["fit", "--config", "{tmp}/typo.yaml"], "unknown config key 'model.head.rank'"),
    ("E03 ill-typed value", [*FIT, "trainer.max_steps=ten"], "config key 'trainer.max_steps' in the command line "
                                                            "expects int, got 'ten'"),
    ("E04 override without =", [*FIT, "max_steps"], "override 'max_steps' is not of the form key=value"),
    ("E05 missing config file", ["fit", "--config", "{tmp}/nope.yaml"], "config file not found"),
    ("E06 invalid YAML", ["fit", "--config", "{tmp}/broken.yaml"], "is not valid YAML"),
    ("E07 rank 0", [*FIT, "model.heads.rank=0"], "model.heads.rank=0 must be >= 1"),
    ("E08 n_future larger than the window", [*FIT, "model.heads.n_future=64"],
     "model.heads.n_future=64 is larger than the window data.seq_len=48"),
    ("E09 heads not dividing the width", [*FIT, "model.gpt.n_head=3"],
     "model.gpt.n_head=3 does not divide model.gpt.d_model=64"),
    ("E10 value not among the choices", [*FIT, "model.heads.kind=conv"],
     "model.heads.kind='conv' is not one of linear, mlp, block"),
    ("E11 missing corpus path", [*FIT, "data.source={tmp}/no_such_dir"], "does not exist"),
    ("E12 empty corpus", [*FIT, "data.source={tmp}/empty"], "{tmp}/empty"),
    ("E13 binary corpus", [*FIT, "data.source={tmp}/blob.txt"], "looks binary"),
    ("E14 non-UTF-8 corpus", [*FIT, "data.source={tmp}/latin1.txt"], "is not valid UTF-8"),
    ("E15 unreachable hub dataset", [*FIT, "data.source=nobody/no-such-dataset"], "nobody/no-such-dataset"),
    ("E16 jsonl without the text column", [*FIT, "data.source={tmp}/rows.jsonl"], "has no column data.text_column"),
    ("E17 unknown embedded corpus", [*FIT, "data.source=shakespear"], "did you mean 'shakespeare'"),
    ("E18 missing tokenizer file", [*FIT, "tokenizer.kind=file", "tokenizer.path={tmp}/no_tok.json"],
     "tokenizer file '{tmp}/no_tok.json' does not exist"),
    ("E19 missing checkpoint", ["generate", "--ckpt", "{tmp}/none.ckpt", "--prompt", "x"], "checkpoint not found"),
    ("E20 truncated checkpoint", ["generate", "--ckpt", "{tmp}/truncated.ckpt", "--prompt", "x"],
     "is truncated or corrupted"),
    ("E21 corrupted checkpoint", ["bench", "--ckpt", "{tmp}/garbage.ckpt"], "is truncated or corrupted"),
    ("E22 not an mtp_lightning checkpoint", ["validate", "--ckpt", "{tmp}/plain.ckpt"],
     "is not an mtp_lightning checkpoint"),
    ("E23 checkpoint from another architecture", ["fit", "--resume", "{tmp}/good/checkpoints/last.ckpt",
                                                 "model.heads.rank=5"], "does not match the model built from"),
    ("E24 checkpoint with another tokenizer", ["generate", "--ckpt", "{tmp}/swapped_tok.ckpt", "--prompt", "x"],
     "tokenizer has"),
    ("E25 --resume with nothing to resume", [*FIT, "--resume", "last", "run.root={runs}", "run.name=ghost"],
     "nothing to resume"),
    ("E26 run name that would overwrite", [*FIT, "run.root={tmp}", "run.name=good"], "run 'good' already exists"),
    ("E27 GPU asked on a CPU machine", [*FIT, "trainer.accelerator=gpu"], "this machine has no CUDA GPU"),
    ("E28 more CPU processes than sensible", [*FIT, "trainer.devices=64"], "trainer.devices=64"),
    ("E29 fp16 on the CPU", [*FIT, "trainer.precision=16-mixed", "trainer.accelerator=cpu"],
     "16-mixed needs a GPU"),
    ("E30 empty prompt", ["generate", "--ckpt", "{tmp}/good/checkpoints/last.ckpt", "--prompt", ""],
     "--prompt is empty"),
    ("E31 draft length beyond the heads", ["generate", "--ckpt", "{tmp}/good/checkpoints/last.ckpt", "--prompt",
                                          "x", "--draft-len", "9"], "--draft-len=9 must be between 0"),
    ("E32 missing prompts file", ["bench", "--ckpt", "{tmp}/good/checkpoints/last.ckpt", "--prompts",
                                  "{tmp}/prompts.txt", "--prompt-len", "16", "--max-new-tokens", "16"], "--prompts '{tmp}/prompts.txt' is neither 'val'"),
    ("E33 decoding beyond the context", [*FIT, "spec.prompt_len=90"], "exceeds model.gpt.max_seq_len=96"),
    ("E34 run name with a slash", [*FIT, "run.name=a/b"], "must be a plain folder name"),
    ("E35 negative head learning rate", [*FIT, "optim.head_lr=-1"], "optim.head_lr=-1.0 must be >= 0 (0 uses optim.lr)"),
    ("E36 negative warm-up steps", [*FIT, "optim.warmup_steps=-5"], "optim.warmup_steps=-5 must be >= 0"),
]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    (tmp / "typo.yaml").write_text("model:\n  head:\n    rank: 2\n")
    (tmp / "broken.yaml").write_text("model: [unclosed\n")
    (tmp / "empty").mkdir()
    (tmp / "blob.txt").write_bytes(bytes(range(256)) * 8)
    (tmp / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 50)
    (tmp / "rows.jsonl").write_text('{"body": "print(1)"}\n' * 20)
    # a real, tiny trained run to damage in various ways
    assert main([*FIT, f"run.root={tmp}", "run.name=good", "trainer.max_steps=2", "trainer.val_check_interval=2",
                 "checkpoint.every_n_steps=2", "spec.every_n_val=0"]) == 0
    good = tmp / "good" / "checkpoints" / "last.ckpt"
    data = good.read_bytes()
    (tmp / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp / "garbage.ckpt").write_bytes(b"\x00not a checkpoint" * 100)
    torch.save({"state_dict": {}, "epoch": 0}, tmp / "plain.ckpt")
    ckpt = torch.load(good, weights_only=True)
    from mtp_lightning.data.tokenizer import Tokenizer

    other = Tokenizer.train_bpe(["hello world, a different tokenizer"] * 50, 300)
    ckpt["mtp_lightning"]["tokenizer"] = other.to_json()
    torch.save(ckpt, tmp / "swapped_tok.ckpt")
    return tmp


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(case, fixtures, tmp_path, capsys):
    _, argv, fragment = case
    runs = tmp_path / "runs"
    runs.mkdir()
    fill = lambda s: s.replace("{tmp}", str(fixtures)).replace("{runs}", str(runs))  # noqa: E731
    argv = [fill(a) for a in argv]
    if not any(a.startswith("run.root=") for a in argv) and argv[0] == "fit" and "--resume" not in argv:
        argv.append(f"run.root={runs}")
    before = sorted(p.name for p in fixtures.iterdir())
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fill(fragment) in lines[0]
    assert "Traceback" not in err
    assert list(runs.iterdir()) == []  # no run directory half-created
    assert sorted(p.name for p in fixtures.iterdir()) == before


def test_errors_doc_lists_every_case():
    doc = (REPO / "docs" / "errors.md").read_text()
    ids = re.findall(r"^\| (E\d\d) ", doc, flags=re.M)
    assert ids == [c[0].split()[0] for c in CASES]


def test_real_process_exits_2_fast_without_traceback_unless_debug(tmp_path):
    args = [sys.executable, "-m", "mtp_lightning", "fit", "--config", SMOKE, "model.heads.rank=0"]
    t0 = time.time()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and time.time() - t0 < 30
    assert proc.stderr.strip() == "error: invalid config: model.heads.rank=0 must be >= 1"
    debug = subprocess.run(args + ["--debug"], capture_output=True, text=True, cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert not (tmp_path / "runs").exists()
