"""Kills, signals, crashes during saves, non-finite losses: a run either resumes exactly or says why not."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtp_lightning.checkpoints.io import AtomicCheckpointIO, safe_load
from mtp_lightning.cli import main
from mtp_lightning.errors import UserError

REPO = Path(__file__).resolve().parent.parent
CONF = str(REPO / "conf" / "smoke.yaml")
# dropout and a random subset of positions make the run consume RNG, so resuming must restore it
EXACT = ["run.deterministic=true", "trainer.progress_bar=false", "spec.every_n_val=0", "model.gpt.dropout=0.1",
         "model.loss.position_fraction=0.5", "trainer.max_steps=16", "checkpoint.every_n_steps=4",
         "trainer.val_check_interval=8", "trainer.log_every_n_steps=1"]


def cli(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mtp_lightning", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def weights(ckpt: Path) -> dict:
    return {k: v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}


def losses(run_dir: Path) -> dict[int, float]:
    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    return {e.step: e.value for e in ea.Scalars("train/loss")}


def global_step(ckpt: Path) -> int:
    try:
        return torch.load(ckpt, weights_only=True)["global_step"]
    except Exception:
        return -1


def sigterm_after_first_checkpoint(args: list[str], last: Path) -> tuple[subprocess.Popen, str]:
    """Start ``fit``, send SIGTERM once ``last`` exists (or after 300 s); the process and its stderr."""
    proc = cli(*args)
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc, err


def test_sigkill_then_resume_matches_uninterrupted_run_bit_for_bit(tmp_path):
    ref = cli("fit", "--config", CONF, f"run.root={tmp_path}", "run.name=ref", *EXACT)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    victim = cli("fit", "--config", CONF, f"run.root={tmp_path}", "run.name=victim", *EXACT)
    last = tmp_path / "victim" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while global_step(last) < 8 and victim.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = global_step(last)
    assert 8 <= killed_at < 16

    resumed = cli("fit", "--config", CONF, "--resume", "last", f"run.root={tmp_path}", "run.name=victim", *EXACT)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()

    a, b = weights(tmp_path / "ref" / "checkpoints" / "last.ckpt"), weights(last)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, lb = losses(tmp_path / "ref"), losses(tmp_path / "victim")
    for step in range(killed_at, 16):
        assert la[step] == lb[step], step


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint(tmp_path):
    args = ["fit", "--config", CONF, f"run.root={tmp_path}", "run.name=term", "trainer.progress_bar=false",
            "spec.every_n_val=0", "trainer.max_steps=100000", "trainer.val_check_interval=1000",
            "checkpoint.every_n_steps=5"]
    last = tmp_path / "term" / "checkpoints" / "last.ckpt"
    proc, err = sigterm_after_first_checkpoint(args, last)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Continue with: python -m mtp_lightning fit --resume last run.name=term" in err
    stopped = int(err.split(" at step ")[1].split(";")[0])
    assert torch.load(last, weights_only=True)["global_step"] == stopped


def test_kill_during_save_leaves_the_previous_checkpoint_whole(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 0, "w": torch.zeros(4)}, target)
    # a child saves large checkpoints over the same path in a loop; it is killed mid-write
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, torch\n"
        "from mtp_lightning.checkpoints.io import AtomicCheckpointIO\n"
        "io = AtomicCheckpointIO()\n"
        "for i in range(1, 10**6):\n"
        "    io.save_checkpoint({'step': i, 'w': torch.full((4_000_000,), float(i))}, sys.argv[1])\n"
    ), str(target)], cwd=REPO)
    time.sleep(4.0)
    child.send_signal(signal.SIGKILL)
    child.wait()
    ckpt = torch.load(target, weights_only=True)
    assert ckpt["step"] >= 0 and bool((ckpt["w"] == float(ckpt["step"])).all())


def test_a_failed_save_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="disk full while writing checkpoint .*the previous checkpoint is intact"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def _fit_with_nan(tmp_path, mode, monkeypatch):
    import lightning as L

    from mtp_lightning.training import train

    class PoisonAt(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 6:
                with torch.no_grad():
                    pl_module.model.heads.router.weight.fill_(float("nan"))

    original = train.build_callbacks
    monkeypatch.setattr(train, "build_callbacks", lambda *a: original(*a) + [PoisonAt()])
    return main(["fit", "--config", CONF, f"run.root={tmp_path}", f"run.name={mode}", "trainer.progress_bar=false",
                 "spec.every_n_val=0", "trainer.max_steps=10", "checkpoint.every_n_steps=4",
                 "trainer.val_check_interval=100", f"trainer.on_nonfinite={mode}"])


def test_nonfinite_loss_stops_and_names_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    assert _fit_with_nan(tmp_path, "stop", monkeypatch) == 2
    err = capsys.readouterr().err
    assert "the loss is NaN or infinite at step 6" in err and "last.ckpt" in err
    good = torch.load(tmp_path / "stop" / "checkpoints" / "last.ckpt", weights_only=True)
    assert good["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values() if v.is_floating_point())


def test_nonfinite_loss_skip_mode_counts_skipped_batches(tmp_path, monkeypatch):
    assert _fit_with_nan(tmp_path, "skip", monkeypatch) == 0
    ea = EventAccumulator(str(tmp_path / "skip" / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    assert ea.Scalars("train/nonfinite_skips")[-1].value == 4.0  # steps 6..9 (the router stays NaN)


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "mtp_lightning": {"format": 1}, "x": Payload()}, bad)
    for argv in (["generate", "--ckpt", str(bad), "--prompt", "x"], ["bench", "--ckpt", str(bad)],
                 ["fit", "--resume", str(bad)], ["validate", "--ckpt", str(bad)]):
        assert main(argv) == 2
        assert "would run code when loaded; refusing it" in capsys.readouterr().err
    assert not marker.exists()
    with pytest.raises(UserError):
        safe_load(bad)


def test_resume_after_a_graceful_stop_keeps_one_last_checkpoint(tmp_path):
    args = ["fit", "--config", CONF, f"run.root={tmp_path}", "run.name=twice", "trainer.progress_bar=false",
            "spec.every_n_val=0", "trainer.max_steps=100000", "trainer.val_check_interval=1000",
            "checkpoint.every_n_steps=3"]
    last = tmp_path / "twice" / "checkpoints" / "last.ckpt"
    sigterm_after_first_checkpoint(args, last)
    stopped = global_step(last)
    resumed = cli("fit", "--config", CONF, "--resume", "last", *args[3:-4], "spec.every_n_val=0",
                  f"trainer.max_steps={stopped + 6}", "trainer.val_check_interval=1000", "checkpoint.every_n_steps=3")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert sorted(p.name for p in last.parent.glob("last*.ckpt")) == ["last.ckpt"]
    assert global_step(last) == stopped + 6


def test_newest_checkpoint_is_last_ckpt_else_the_newest_that_loads(tmp_path):
    from mtp_lightning.checkpoints.io import META_KEY, find_resume_checkpoint, newest_checkpoint

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)

    def write(name: str, step: int, mtime: int) -> Path:
        path = folder / name
        torch.save({META_KEY: {"format": 1}, "state_dict": {}, "global_step": step}, path)
        os.utime(path, (mtime, mtime))
        return path

    assert newest_checkpoint(tmp_path / "run") is None
    with pytest.raises(UserError, match="nothing to resume: no checkpoint in"):
        find_resume_checkpoint(tmp_path / "run")
    write("step0000004.ckpt", 4, 1_000)
    write("best-step0000008.ckpt", 8, 3_000)
    write("last.ckpt", 6, 2_000)  # last.ckpt wins even when another file is newer
    path, ckpt = newest_checkpoint(tmp_path / "run")
    assert (path.name, ckpt["global_step"]) == ("last.ckpt", 6)
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100])  # torn by a kill
    path, ckpt = newest_checkpoint(tmp_path / "run")  # then the newest by modification time
    assert (path.name, ckpt["global_step"]) == ("best-step0000008.ckpt", 8)
    os.utime(folder / "step0000004.ckpt", (4_000, 4_000))
    assert find_resume_checkpoint(tmp_path / "run") == folder / "step0000004.ckpt"
    for name in ("step0000004.ckpt", "best-step0000008.ckpt"):
        (folder / name).write_bytes(b"not a checkpoint")
    assert newest_checkpoint(tmp_path / "run") is None
    with pytest.raises(UserError, match="no usable checkpoint in .*: every .ckpt there is truncated"):
        find_resume_checkpoint(tmp_path / "run")
