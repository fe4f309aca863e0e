"""Faults of the machine, each in a real process: a disk that fills during a fit, damaged caches, and
config mistakes reported before torch and Lightning are imported. Each stops with one line (or goes on
after a one-line note), and nothing good is lost.

The full disk is a 5 MiB tmpfs where this process may mount one (root). Elsewhere the fit runs under
a stand-in: once the run folder holds 3 MiB (a 2 MiB checkpoint would not fit in the 5 MiB), each checkpoint
``mtp_lightning.atomic`` opens for writing is /dev/full, whose writes fail with ENOSPC from the kernel.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtp_lightning.config import load_config
from mtp_lightning.data import build_datamodule

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "conf" / "smoke.yaml")
FIT = ["fit", "--config", SMOKE, "trainer.progress_bar=false", "spec.every_n_val=0", "trainer.max_steps=4",
       "trainer.val_check_interval=2", "checkpoint.every_n_steps=2", "run.name=full"]
DISK_FULL_END = "; the previous checkpoint is intact: free space, then continue with `fit --resume last`"
ON_DEV_FULL = """
import builtins, sys
from pathlib import Path
from mtp_lightning import atomic
from mtp_lightning.cli import main
real_open, root = builtins.open, Path(sys.argv[1])
def used():
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
def open_on_a_full_disk(path, mode="r", *a, **k):
    return real_open("/dev/full" if ".ckpt." in str(path) and used() > 3 * 2**20 else path, mode, *a, **k)
atomic.open = open_on_a_full_disk
sys.exit(main(sys.argv[2:]))
"""


def cli(args: list[str], full_disk_at: Path | None = None, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", ON_DEV_FULL, str(full_disk_at)] if full_disk_at else [sys.executable, "-m",
                                                                                        "mtp_lightning"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=REPO, timeout=600, **kw)


@pytest.fixture
def small_disk(tmp_path):
    """(run root, whether it is a real 5 MiB tmpfs); the tmpfs is unmounted afterwards."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(folder)],
                                                   capture_output=True).returncode == 0
    yield folder, mounted
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


def step_of(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=True)["global_step"]


def assert_disk_full_line(proc, last: Path) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: disk full while writing checkpoint '{last}': no space left on the "
                               f"filesystem mounted at '"), lines[0]
    assert lines[0].endswith(DISK_FULL_END), lines[0]


def test_a_full_disk_stops_the_fit_in_one_line_and_keeps_the_last_checkpoint(small_disk):
    root, mounted = small_disk
    last = root / "full" / "checkpoints" / "last.ckpt"
    # step 2 writes last.ckpt, its validation the best checkpoint; rewriting last.ckpt then fills the disk
    proc = cli([*FIT, f"run.root={root}"], full_disk_at=None if mounted else root)
    assert_disk_full_line(proc, last)
    assert sorted(p.name for p in last.parent.iterdir()) == ["best-step0000002.ckpt", "last.ckpt"]
    assert step_of(last) == 2


@pytest.mark.slow
def test_resume_on_a_full_disk_says_so_and_resumes_once_there_is_room(small_disk):
    root, mounted = small_disk
    last = root / "full" / "checkpoints" / "last.ckpt"
    on_dev_full = None if mounted else root
    assert_disk_full_line(cli([*FIT, f"run.root={root}"], full_disk_at=on_dev_full), last)
    # the disk is still full: the resumed run trains steps 3-4 and cannot save step 4
    assert_disk_full_line(cli([*FIT, "--resume", "last", f"run.root={root}"], full_disk_at=on_dev_full), last)
    assert step_of(last) == 2 and sorted(p.name for p in last.parent.iterdir()) == ["best-step0000002.ckpt",
                                                                                    "last.ckpt"]
    if mounted:
        subprocess.run(["mount", "-o", "remount,size=64m", str(root)], check=True)
    proc = cli([*FIT, "--resume", "last", f"run.root={root}"])  # room again
    assert proc.returncode == 0, proc.stderr
    assert step_of(last) == 4


def test_truncated_token_and_tokenizer_caches_are_rebuilt_with_a_note(tmp_path):
    cache = tmp_path / "cache"
    cfg = load_config([SMOKE], [f"data.cache_dir={cache}"])
    build_datamodule(cfg.data, cfg.tokenizer, cfg.model.heads.n_future, cfg.run.seed).prepare_corpus()
    tokenizer, train = next(cache.glob("tokenizer-*.json")), next(cache.glob("corpus-*/train.npy"))
    good = {p: p.read_bytes() for p in (tokenizer, train)}
    for p, data in good.items():
        p.write_bytes(data[: len(data) // 2])
    proc = cli(["fit", "--config", SMOKE, f"data.cache_dir={cache}", f"run.root={tmp_path / 'runs'}",
                "trainer.max_steps=1", "trainer.val_check_interval=1", "checkpoint.every_n_steps=1",
                "spec.every_n_val=0", "trainer.progress_bar=false"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        f"note: the tokenizer cache '{tokenizer}' is damaged (tokenizer.json holds {len(good[tokenizer]) // 2} "
        f"bytes, its manifest says {len(good[tokenizer])}); rebuilding it".replace(
            "tokenizer.json holds", f"{tokenizer.name} holds"),
        f"note: the token cache '{train.parent}' is damaged (train.npy holds {len(good[train]) // 2} bytes, its "
        f"manifest says {len(good[train])}); rebuilding it",
    ]
    assert {p: p.read_bytes() for p in good} == good


@pytest.mark.parametrize("argv, message", [
    (["fit", "--config", SMOKE, "optim.head_lr=-1"], "error: invalid config: optim.head_lr=-1.0 must be >= 0 "
                                                     "(0 uses optim.lr)"),
    (["fit", "--config", SMOKE, "trainer.max_stpes=5"], "error: unknown config key 'trainer.max_stpes' in the "
     "command line (did you mean 'trainer.max_steps'?); see `python -m mtp_lightning fit --print-config` for "
     "every key"),
    (["fit", "--resume", "some/run/checkpoints/last.ckpt", "optim.warmup_steps=soon"],
     "error: config key 'optim.warmup_steps' in the command line expects int, got 'soon'"),
    (["validate", "--config", SMOKE, "optim.warmup_steps=-1"], "error: invalid config: optim.warmup_steps=-1 "
                                                               "must be >= 0"),
    (["sweep", "--config", str(Path(SMOKE).parent / "sweep_rank.yaml"), "model.heads.rnk=3"],
     "error: unknown config key 'model.heads.rnk' in the command line (did you mean 'model.heads.rank'?); see "
     "`python -m mtp_lightning fit --print-config` for every key"),
])
def test_config_errors_come_before_torch_and_lightning_are_imported(tmp_path, argv, message):
    """The real command under ``-X importtime``: the one error line, and no torch or Lightning import."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "mtp_lightning", *argv], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 2
    timings = [ln for ln in proc.stderr.splitlines() if ln.startswith("import time:")]
    others = [ln for ln in proc.stderr.splitlines() if not ln.startswith("import time:")]
    assert others == [message]
    imported = {ln.rsplit("|", 1)[1].strip().split(".")[0] for ln in timings[1:]}
    assert "omegaconf" in imported and not imported & {"torch", "lightning", "numpy"}
