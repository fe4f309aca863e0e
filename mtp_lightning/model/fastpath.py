"""Decoding-time matrix products with few rows, on the CPU.

Decoding multiplies 1 to ~16 rows (one token, or a draft of k+1 tokens, per sequence) by every weight
matrix. For such skinny products torch's CPU ``F.linear(x, W)`` (W stored (out, in)) is 1.3-3x slower
than ``x @ Wt`` with a contiguous (in, out) copy of W: measured on the 2-core AMD EPYC (AVX2) of
docs/benchmarks.md, 4 rows x 1024 -> 256 took 238 us against 80 us, and 4 x 256 -> 4096 (the
unembedding) 429 us against 331 us. ``skinny_linear`` uses such a transposed copy when it applies
(CPU, no autograd, at most ``MAX_ROWS`` rows) and ``F.linear`` otherwise, so training is untouched.

The copies live only inside ``with decoding():`` (the decoders open it around a whole generation, during
which no weight changes) and are dropped when it closes, so a training step or an FSDP re-gather can
never leave a stale copy behind. Inside it a copy is also rebuilt if its weight's version or storage
changed.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

MAX_ROWS = 16
_transposed = WeakTensorKeyDictionary()  # weight -> (version, data_ptr, {index: transposed copy})
_depth = 0  # open ``decoding()`` blocks


@contextmanager
def decoding():
    """Enable the few-row path for the block; the transposed copies are freed when the outermost
    block closes."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _transposed.clear()


def transposed(weight: torch.Tensor, index: int | None = None) -> torch.Tensor:
    """A contiguous (in, out) copy of ``weight`` (out, in), or of ``weight[index]`` flattened to
    (in, rest) for a stacked weight (k, ..., in); cached until the weight changes."""
    key = (weight._version, weight.data_ptr())
    hit = _transposed.get(weight)
    if hit is None or hit[:2] != key:
        hit = (*key, {})
        _transposed[weight] = hit
    wt = hit[2].get(index)
    if wt is None:
        with torch.no_grad():
            w = weight.detach() if index is None else weight.detach()[index]
            wt = w.reshape(-1, w.shape[-1]).t().contiguous()
        hit[2][index] = wt
    return wt


def applies(x: torch.Tensor) -> bool:
    """Inside ``decoding()``, on the CPU, without autograd, for at most ``MAX_ROWS`` rows."""
    return (_depth > 0 and x.device.type == "cpu" and not torch.is_grad_enabled() and x.dim() >= 1
            and x.shape[-1] > 0 and x.numel() // x.shape[-1] <= MAX_ROWS)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the cached transposed weight for few-row inference."""
    if not applies(x) or x.dtype != weight.dtype:
        return F.linear(x, weight, bias)
    y = x @ transposed(weight)
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """``nn.Linear`` whose few-row inference goes through ``skinny_linear``; same parameters and
    state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return skinny_linear(x, self.weight, self.bias)
