"""Decoding-time matrix products with few rows, on the CPU.

Decoding multiplies a few rows (one token, or a draft of k+1 tokens, per sequence) by every weight
matrix. torch's CPU ``F.linear(x, W)`` is slow for such skinny products, for two reasons measured on the
2-core AMD EPYC (AVX2) of docs/benchmarks.md ("Few-row products"):
- one row: ``x @ Wt`` with a contiguous (in, out) copy of W takes MKL's matrix-vector path, up to 2x
  faster than ``F.linear`` when the output is at least as wide as the input (256 -> 4096: 190-240
  against 450-480 us with the weights out of cache); into a narrower output ``F.linear`` wins;
- several rows: every call repacks the whole weight into MKL's blocked layout, so 4 rows cost 2-4x one
  row although they read the same weight. oneDNN's linear over a weight reordered once into its own
  blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, the same pair of ops inductor's
  ``freezing`` uses on the CPU) skips that: 4 x 256 -> 4096 took 271-285 us against 938-997 us.

Both still cost far more than reading the weight: oneDNN spends 30-40 us per call even on 4 x 256 -> 256.
So ``project`` first tries this project's own kernel (``native.py``, ``fewrow.cpp``: AVX2, built on
first use, a weight packed once), which streams the weight once for all rows: up to ``NATIVE_MAX_ROWS``
rows, float32, an output width divisible by 8. Without it (no compiler, no AVX2,
``MTP_LIGHTNING_NATIVE=0``) and for more rows, one row goes through a transposed copy (or ``F.linear``
into a narrower output) and 2..``MAX_ROWS`` rows through a oneDNN reordered copy (where this torch build
has oneDNN). Outside decoding (CPU, no autograd, at most ``MAX_ROWS`` rows) it is ``F.linear``, so
training is untouched. ``python benchmarks/skinny_matmul.py`` prints the ways side by side.

Drafts may also go through an int8 copy (``project_int8``): a speculative draft only proposes tokens,
and the verifier, computed in full precision, decides what is emitted, so a cheaper draft changes
speed, never the output (greedy: the verifier's argmax; sampling: the residual rule uses the same
draft distribution that was sampled from). The int8 copy has one scale per output row and reads a quarter
of the bytes. With the kernel it is the kernel's int8 product (only the weight quantized; the activations
and sums stay float32); without it fbgemm's dynamic linear (``torch.ops.quantized.linear_dynamic``),
which also quantizes the activations per call. ``python benchmarks/skinny_matmul.py`` times both.

The copies live only inside ``with decoding():`` (the decoders open it around a whole generation, during
which no weight changes) and are dropped when it closes, so a training step or an FSDP re-gather can
never leave a stale copy behind. Inside it a copy is also rebuilt if its weight's version or storage
changed.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

from mtp_lightning.model import native

MAX_ROWS = 256  # a batch of 8 rows verifying 4 positions with 4 experts has 128
NATIVE_MAX_ROWS = 64  # up to here the kernel beats oneDNN on the decoders' shapes (docs/benchmarks.md)
_copies = WeakTensorKeyDictionary()  # weight -> (version, data_ptr, {(kind, index): copy})
_depth = 0  # open ``decoding()`` blocks
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# fbgemm's int8 dynamic linear (the x86 engine): the AVX2/AVX-512 kernels behind ``project_int8``
INT8 = (torch.backends.quantized.engine in ("x86", "fbgemm")
        and hasattr(torch.ops.quantized, "linear_dynamic") and hasattr(torch.ops.quantized, "linear_prepack"))


@contextmanager
def decoding():
    """Enable the few-row path for the block; the weight copies are freed when the outermost block
    closes."""
    global _depth
    if _depth == 0:
        native.kernel()  # built (or found) once per process, before any timed work
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _copies.clear()


def _weight_rows(weight: torch.Tensor, index) -> torch.Tensor:
    """``weight`` (out, in), or ``weight[index]`` (a stacked weight (k, ..., in) indexed by an int or a
    slice) flattened to (rest, in)."""
    w = weight.detach() if index is None else weight.detach()[index]
    return w.reshape(-1, w.shape[-1])


def _copy(weight: torch.Tensor, index, kind: str) -> torch.Tensor | None:
    key = (weight._version, weight.data_ptr())
    hit = _copies.get(weight)
    if hit is None or hit[:2] != key:
        hit = (*key, {})
        _copies[weight] = hit
    slot = (kind, (index.start, index.stop, index.step) if isinstance(index, slice) else index)
    if slot in hit[2]:
        return hit[2][slot]
    with torch.no_grad():
        w = _weight_rows(weight, index)
        if kind == "t":
            c = w.t().contiguous()
        elif kind == "dnn":
            c = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)
        elif kind == "fr":  # None: a width the kernel does not take (not a multiple of 8)
            c = native.pack(w) if native.supports(w.shape[0]) else None
        elif kind == "n8":  # the kernel's int8 copy and its scales, or None as for "fr"
            c = native.pack_q8(w) if native.supports(w.shape[0]) else None
        else:
            c = _pack_int8(w)
    hit[2][slot] = c
    return c


def _pack_int8(w: torch.Tensor) -> torch.Tensor:
    """fbgemm's packed int8 copy of w (out, in): symmetric, one scale per output row."""
    w = w.float().contiguous()
    scale = native.q8_scales(w).double()
    with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao, still in 2.x
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None)


def transposed(weight: torch.Tensor, index=None) -> torch.Tensor:
    """A contiguous (in, out) copy of ``weight`` (out, in), or of ``weight[index]`` flattened to
    (in, rest) for a stacked weight (k, ..., in); cached until the weight changes."""
    return _copy(weight, index, "t")


def applies(x: torch.Tensor) -> bool:
    """Inside ``decoding()``, on the CPU, without autograd, for at most ``MAX_ROWS`` rows."""
    return (_depth > 0 and x.device.type == "cpu" and not torch.is_grad_enabled() and x.dim() >= 1
            and x.shape[-1] > 0 and x.numel() // x.shape[-1] <= MAX_ROWS)


def project(x: torch.Tensor, weight: torch.Tensor, index=None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) times ``weight`` (out, in) transposed, or ``weight[index]`` flattened to (rest, in):
    (..., out). The few-row paths inside ``decoding()``, ``F.linear`` otherwise."""
    if not applies(x) or x.dtype != weight.dtype:
        w = weight if index is None else weight[index]  # autograd may be on: no detach here
        return F.linear(x, w.reshape(-1, w.shape[-1]), bias)
    if native._lib is not None and x.dtype == torch.float32 and x.numel() <= NATIVE_MAX_ROWS * x.shape[-1]:
        packed = _copy(weight, index, "fr")
        if packed is not None:
            return native.linear(x, packed, bias, packed.numel() // x.shape[-1])
    if _ONEDNN and x.numel() > x.shape[-1]:  # several rows
        return torch.ops.mkldnn._linear_pointwise(x, _copy(weight, index, "dnn"), bias, "none", [], "")
    if weight.dim() == 2 and weight.shape[1] > weight.shape[0]:
        # one row into a narrower output (the MLP's 1024 -> 256): the dot-product form over W's own
        # rows beats the transposed copy with the weights out of cache (80-88 against 122-124 us)
        return F.linear(x, weight, bias)
    y = x @ transposed(weight, index)
    return y if bias is None else y + bias


def project_int8(x: torch.Tensor, weight: torch.Tensor, index=None) -> torch.Tensor:
    """``project`` through an int8 copy of the weight where ``applies(x)``: approximate (about 1-2%
    relative error in the output), for speculative drafts only. The kernel's int8 product
    (``native.linear_q8``: int8 weight, float32 activations and sums) where it takes the shape, else
    fbgemm's dynamic linear (``INT8``), else ``project``."""
    if not applies(x) or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return project(x, weight, index)
    if native._lib is not None and x.numel() <= NATIVE_MAX_ROWS * x.shape[-1]:
        packed = _copy(weight, index, "n8")
        if packed is not None:
            return native.linear_q8(x, packed, packed[1].numel())
    if not INT8:
        return project(x, weight, index)
    y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]), _copy(weight, index, "q8"), True)
    return y.view(*x.shape[:-1], y.shape[-1])


def int8_available() -> bool:
    """Whether ``project_int8`` really runs in int8 here (the kernel, or fbgemm's engine)."""
    return native.kernel() is not None or INT8


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the cached weight copies for few-row inference."""
    return project(x, weight, None, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose few-row inference goes through ``skinny_linear``; same parameters and
    state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return skinny_linear(x, self.weight, self.bias)
