"""Histogram of expert use for TensorBoard: which expert wins each position, every N steps."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override


class MixtureHistogramCallback(L.Callback):
    """Writes ``train/expert_use``: the distribution of the router's top expert over a batch's positions.

    The module keeps the last training step's choices (``last_expert_choice``, a (N,) tensor); scalars
    of the same health (weights, win shares, entropy, dead experts) are logged by the module itself.
    """

    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = max(1, every_n_steps)

    @override
    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        choice = getattr(pl_module, "last_expert_choice", None)
        if choice is None or trainer.global_step % self.every_n_steps:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                r = pl_module.model.rank
                logger.experiment.add_histogram("train/expert_use", choice.float().cpu(),
                                                global_step=trainer.global_step, bins=r if r > 1 else 2)
