"""Cutting a flat token stream into training windows, and a window into inputs and n-step targets.

A window holds ``T + n`` tokens (T = ``seq_len``, n = ``n_future``). Window i starts at token ``i * T``:
the stride is T, not T + n, so consecutive windows overlap by n tokens. That overlap is what lets every
token be an input exactly once while every input position still sees all n of its future targets.

Pure numpy/torch; nothing here knows about Lightning, files or tokenizers.
"""

from __future__ import annotations

import numpy as np
import torch


def num_windows(n_tokens: int, seq_len: int, n_future: int) -> int:
    """How many full windows of ``seq_len + n_future`` tokens, at stride ``seq_len``, fit in the stream.

    Window i needs tokens ``[i*T, i*T + T + n)``, so the last one must satisfy ``i*T + T + n <= L``,
    which gives ``(L - n) // T`` windows (0 when the stream is shorter than one window).
    """
    assert seq_len >= 1 and n_future >= 1, (seq_len, n_future)
    return max(0, (n_tokens - n_future) // seq_len)


def pack_windows(ids: np.ndarray, seq_len: int, n_future: int) -> np.ndarray:
    """All windows of a 1-D token stream as a read-only strided view (no copy), shape (N, T + n).

    Worked example, ``ids = [10, 11, ..., 19]`` (L = 10), ``seq_len = 3``, ``n_future = 2``::

        N = (10 - 2) // 3 = 2
        window 0 = ids[0:5] = [10, 11, 12, 13, 14]    inputs [10, 11, 12]
        window 1 = ids[3:8] = [13, 14, 15, 16, 17]    inputs [13, 14, 15]

    The inputs 10..15 each appear once. Window 2 would need ids[6:11], one token past the end, so the
    tail 16..19 is only ever a target. Indexing the view with a list of window ids (``view[idx]``) copies
    just those rows, which is how a batch is gathered from a memory-mapped stream.
    """
    assert ids.ndim == 1, ids.shape
    n = num_windows(len(ids), seq_len, n_future)
    width = seq_len + n_future
    if n == 0:
        return np.empty((0, width), dtype=ids.dtype)
    # sliding_window_view gives every start 0..L-width; taking each T-th row keeps stride T. (N, T+n)
    view = np.lib.stride_tricks.sliding_window_view(ids, width)[::seq_len][:n]
    assert view.shape == (n, width), view.shape
    return view


def split_window(window: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, T) and targets (B, T, n) of a batch of windows (B, T + n); both are views.

    ``targets[b, t, s] = window[b, t + 1 + s]``: offset s = 0 is the next token. For a window
    ``[10, 11, 12, 13, 14]`` and n = 2 (T = 3)::

        inputs  = [10, 11, 12]
        targets = [[11, 12], [12, 13], [13, 14]]
    """
    assert window.dim() == 2 and window.size(1) > n >= 1, (tuple(window.shape), n)
    seq_len = window.size(1) - n
    inputs = window[:, :seq_len]  # (B, T)
    # unfold over the shifted stream window[:, 1:] (B, T+n-1) gives (B, T, n) sliding rows, no copy
    targets = window[:, 1:].unfold(1, n, 1)  # (B, T, n)
    assert targets.shape == (window.size(0), seq_len, n), tuple(targets.shape)
    return inputs, targets


def batch_windows(batch) -> torch.Tensor:
    """The windows (B, T + n) of a training batch: the batch itself, or the first of (windows, cached
    hidden states)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def predicted_tokens(batch, n_future: int) -> int:
    """Positions a batch of windows (B, T + n_future) trains: B * T, not the windows' length (the
    throughput monitor and the progress lines count these)."""
    window = batch_windows(batch)
    return window.shape[0] * (window.shape[1] - n_future)
