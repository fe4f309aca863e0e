"""Stop cleanly on SIGTERM / SIGINT: finish the step, write ``last.ckpt``, skip any further validation,
say how to resume. Also make sure a finished run's final state is in ``last.ckpt``."""

from __future__ import annotations

import signal

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override


class GracefulStopCallback(L.Callback):
    """Replaces the SIGTERM/SIGINT handlers during ``fit`` with a flag checked at each step boundary.

    Under several processes the flag is agreed by a collective (``reduce_boolean_decision``), so every
    rank stops at the same step and the checkpoint save, itself collective, cannot deadlock.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}
        self.stopped_at: int | None = None
        self.checkpoint_path: str | None = None

    def _handler(self, signum, frame) -> None:
        self.received = signum

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. inside some test runners): leave them be
                pass

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        flag = self.received is not None
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce_boolean_decision(flag, all=False)
        if not flag:
            return
        ckpt_cb = self._periodic(trainer)
        if ckpt_cb is not None:
            self.checkpoint_path = f"{ckpt_cb.dirpath}/last.ckpt"
            trainer.save_checkpoint(self.checkpoint_path, weights_only=False)
        self.stopped_at = trainer.global_step
        trainer.should_stop = True
        # Lightning validates once more when should_stop is set (for early stopping), which can take
        # minutes; a signal asks to stop now. With no validation batches enable_validation is False,
        # so that validation is skipped (this trainer ends here; a resume builds a new one).
        trainer.limit_val_batches = 0

    @override
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._saved_step = trainer.global_step

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        # a run whose last step is not a multiple of checkpoint.every_n_steps still ends with its final
        # state in last.ckpt
        ckpt_cb = self._periodic(trainer)
        if ckpt_cb is not None and getattr(self, "_saved_step", None) != trainer.global_step:
            # weights_only=False: the full training state (optimizer, loops), said explicitly; left unset,
            # Lightning logs "`weights_only` was not set, defaulting to `False`" on every such save
            trainer.save_checkpoint(f"{ckpt_cb.dirpath}/last.ckpt", weights_only=False)

    @staticmethod
    def _periodic(trainer):
        return next((c for c in trainer.checkpoint_callbacks
                     if isinstance(c, ModelCheckpoint) and c.monitor is None and c.dirpath), None)

    @override
    def teardown(self, trainer, pl_module, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
