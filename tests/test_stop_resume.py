"""A signal stop and its resume: no validation after the signal, and the resumed run validates and logs
at exactly the steps of an uninterrupted one."""

from pathlib import Path

import pytest
import torch

import mtp_lightning.callbacks.safety as safety
from mtp_lightning.cli import main

CONF = str(Path(__file__).resolve().parent.parent / "conf" / "smoke.yaml")

COMMON = ["trainer.progress_bar=false", "trainer.val_check_interval=5", "checkpoint.every_n_steps=6",
          "trainer.log_every_n_steps=1", "trainer.limit_val_batches=1", "spec.every_n_val=0"]


@pytest.mark.slow
def test_signal_stop_skips_validation_and_resume_keeps_the_schedule(tmp_path, monkeypatch, tb_scalars):
    root = [f"run.root={tmp_path}"]
    assert main(["fit", "--config", CONF, "run.name=whole", "trainer.max_steps=20", *COMMON, *root]) == 0
    handler_flag = safety.GracefulStopCallback.on_train_batch_end

    def signal_at_13(self, trainer, *args):
        if trainer.global_step == 13:  # what the SIGTERM handler does: set the flag
            self.received = 15
        return handler_flag(self, trainer, *args)

    monkeypatch.setattr(safety.GracefulStopCallback, "on_train_batch_end", signal_at_13)
    assert main(["fit", "--config", CONF, "run.name=cut", "trainer.max_steps=20", *COMMON, *root]) == 128 + 15
    run = tmp_path / "cut"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 13
    assert [s for s, _ in tb_scalars(run)["val/loss"]] == [5, 10]  # none at the stop step
    monkeypatch.setattr(safety.GracefulStopCallback, "on_train_batch_end", handler_flag)
    assert main(["fit", "--config", CONF, "--resume", "last", "run.name=cut", "trainer.max_steps=20",
                 *COMMON, *root]) == 0
    whole, cut = tb_scalars(tmp_path / "whole"), tb_scalars(run)
    assert [s for s, _ in cut["val/loss"]] == [s for s, _ in whole["val/loss"]]
    assert [s for s, _ in cut["train/loss"]] == [s for s, _ in whole["train/loss"]]  # no step twice


def test_stop_and_resume_saves_say_weights_only(tmp_path, monkeypatch):
    """Lightning logs "`weights_only` was not set, defaulting to `False`" (logging.info, from its
    checkpoint connector) for each save that leaves weights_only unset. The final save of a run that
    ends between checkpoints, the save of a signal stop and those of its resume set it."""
    import logging

    records: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())
    connector = logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector")
    connector.addHandler(handler)  # on the logger itself: seen whether or not Lightning's logger propagates
    monkeypatch.setattr(connector, "level", logging.INFO)
    args = ["--config", CONF, "run.name=w", f"run.root={tmp_path}", "trainer.progress_bar=false",
            "trainer.val_check_interval=100", "checkpoint.every_n_steps=2", "trainer.log_every_n_steps=1",
            "spec.every_n_val=0", "data.batch_size=2", "data.seq_len=16"]
    handler_flag = safety.GracefulStopCallback.on_train_batch_end

    def signal_at_4(self, trainer, *a):
        if trainer.global_step == 4:
            self.received = 15
        return handler_flag(self, trainer, *a)

    try:
        assert main(["fit", *args, "trainer.max_steps=3"]) == 0  # ends between checkpoints: a final save
        monkeypatch.setattr(safety.GracefulStopCallback, "on_train_batch_end", signal_at_4)
        assert main(["fit", "--resume", "last", *args, "trainer.max_steps=6"]) == 128 + 15
        monkeypatch.setattr(safety.GracefulStopCallback, "on_train_batch_end", handler_flag)
        assert main(["fit", "--resume", "last", *args, "trainer.max_steps=5"]) == 0
    finally:
        connector.removeHandler(handler)
    assert torch.load(tmp_path / "w" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    assert [m for m in records if "weights_only" in m] == []
