"""Progress as plain lines, for runs without the progress bar (``trainer.progress_bar=false``): logs,
batch jobs, pipes. One line every ``trainer.log_every_n_steps`` optimizer steps, on rank zero."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from mtp_lightning.data.packing import predicted_tokens


def format_eta(seconds: float) -> str:
    """``H:MM:SS``, e.g. ``format_eta(3725.4) == "1:02:05"``."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(step: int, max_steps: int, loss: float | None, tokens_per_s: float, eta_s: float,
                  draft_tuning: bool = False) -> str:
    """``step 4/12: loss 5.123, 1,234 tok/s, ETA 0:00:12`` (``loss -`` before the module logged one);
    during draft tuning ``step 9/12: draft tuning, draft NLL 1.234 per token, ETA 0:00:03`` (its steps
    train on the pool of continuations, so the loader's tokens/s does not apply)."""
    shown = "-" if loss is None else f"{loss:.3f}"
    if draft_tuning:
        return f"step {step}/{max_steps}: draft tuning, draft NLL {shown} per token, ETA {format_eta(eta_s)}"
    return f"step {step}/{max_steps}: loss {shown}, {tokens_per_s:,.0f} tok/s, ETA {format_eta(eta_s)}"


class ProgressLines(L.Callback):
    """Prints ``progress_line`` after every ``every_n_steps``-th optimizer step (``trainer.global_step``,
    so with gradient accumulation a line still marks optimizer steps, not micro-batches).

    tok/s counts the predicted positions of the loader's windows (as the throughput monitor does) since
    the previous line; the ETA extrapolates this invocation's mean time per step to ``max_steps``.
    """

    def __init__(self, every_n_steps: int, n_future: int):
        self.every_n_steps = max(1, every_n_steps)
        self.n_future = n_future
        self._tokens = 0

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        self._start_step = self._last_step = trainer.global_step
        self._start_time = self._last_time = time.perf_counter()
        self._tokens = 0

    @override
    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        drafting = getattr(pl_module, "draft_tuning", False)
        if not drafting:  # draft steps train on the pool, not on the batch
            self._tokens += predicted_tokens(batch, self.n_future)
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps:
            return  # a micro-batch of an accumulated step, or not a logging step
        now = time.perf_counter()
        loss = trainer.callback_metrics.get("train/draft_nll_per_token" if drafting else "train/loss")
        rate = self._tokens / max(now - self._last_time, 1e-9)
        eta = (now - self._start_time) / (step - self._start_step) * (trainer.max_steps - step)
        print(progress_line(step, trainer.max_steps, None if loss is None else float(loss), rate, eta, drafting),
              flush=True)
        self._last_step, self._last_time, self._tokens = step, now, 0
