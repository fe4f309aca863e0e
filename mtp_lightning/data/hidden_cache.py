"""The frozen backbone's last hidden states, computed once per training or validation window and
cached on disk (``model.backbone.cache_states``).

Trained heads-only, a pretrained backbone maps a window to the same hidden states z every epoch, for
every point of a sweep and for every run on the same data: only the heads change. The trunk's forward
then costs nothing after its first pass; the heads read z from a memory-mapped array.

An entry is one split's windows for one (backbone, corpus, tokenizer, window length, precision): its
folder name is a fingerprint of the backbone's weights (``HFTrunk.fingerprint``), the token cache's
folder (corpus and tokenizer), ``data.seq_len``, the split and the autocast dtype the trunk ran under.
It holds

- ``ids.npy`` (K,) int64, the sorted window ids it covers;
- ``states.npy`` (K, T, D), z for those windows in the dtype the trunk returned;
- a manifest (``atomic.cached_entry``) written after both, so a crash mid-build leaves no entry that
  looks whole, and a damaged one is rebuilt.

A run needs the windows its sampler will draw (``run_window_ids``): a short run on a big corpus caches
only those. A later run that needs more (more steps, another seed) extends the entry: the states it
holds are copied, only the missing windows go through the trunk, and the new files replace the old
ones atomically.

Shape legend: K windows cached, B batch, T = ``data.seq_len`` positions, D width.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mtp_lightning.atomic import Damaged, cached_entry, read_manifest, writing, writing_path
from mtp_lightning.data.sampler import ResumableBatchSampler

MANIFEST = "states.manifest"


def run_window_ids(n_items: int, batch_size: int, seed: int, batches: int) -> np.ndarray:
    """The sorted ids of the windows the training stream's first ``batches`` global batches draw
    (``sampler.ResumableBatchSampler``, from sample 0): every window a run of that many batches can
    see, on any rank and after any resume. ``batches <= 0`` (no step limit): all of them."""
    if batches <= 0 or batches * batch_size >= n_items:
        return np.arange(n_items, dtype=np.int64)
    sampler = ResumableBatchSampler(n_items, batch_size, seed)
    ids = np.fromiter((i for g in range(batches) for i in sampler.global_batch(g)), dtype=np.int64)
    return np.unique(ids)


class HiddenStates:
    """A verified entry, read-only: ``gather(window_ids)`` -> z (B, T, D) as a tensor."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.ids = np.load(folder / "ids.npy")  # (K,) sorted
        self._states: np.ndarray | None = None  # (K, T, D) memory map, opened on first use

    def covers(self, ids: np.ndarray) -> bool:
        pos = np.searchsorted(self.ids, ids)
        return bool(np.all(pos < len(self.ids)) and np.array_equal(self.ids[np.minimum(pos, len(self.ids) - 1)], ids))

    def gather(self, window_ids) -> torch.Tensor | None:
        """z (B, T, D) of these windows, or None when the entry lacks one of them (the batches a run
        draws past the steps it was cached for, e.g. the loader's ignored batches during draft tuning:
        the caller then runs the backbone)."""
        ids = np.asarray(window_ids, dtype=np.int64)
        if not self.covers(ids):
            return None
        if self._states is None:
            self._states = np.load(self.folder / "states.npy", mmap_mode="r")
        return torch.from_numpy(np.ascontiguousarray(self._states[np.searchsorted(self.ids, ids)]))

    def __getstate__(self) -> dict:  # DataLoader workers open their own map
        return {**self.__dict__, "_states": None}


def ensure_states(folder: Path, needed: np.ndarray, windows: Callable[[np.ndarray], torch.Tensor],
                  encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
                  report: Callable[[str], None] | None = None) -> HiddenStates:
    """The entry in ``folder`` covering the window ids ``needed`` (sorted), built or extended first if
    it does not: ``windows(ids)`` gives their input tokens (k, T), ``encode`` maps those to z (k, T, D)
    (the frozen trunk, without autograd), ``batch_size`` windows at a time. ``report`` gets progress
    lines (every eighth of the windows to encode, and the end)."""
    manifest = folder / MANIFEST
    try:
        record = read_manifest(manifest)
    except Damaged:
        record = None  # cached_entry says so and rebuilds
    if record is not None and HiddenStates(folder).covers(needed):
        return HiddenStates(folder)
    if record is not None:
        # more windows than the entry has: drop its manifest, so the build below runs and extends it
        manifest.unlink(missing_ok=True)

    def build() -> tuple[list[Path], dict]:
        old = None
        if record is not None:  # extending a verified entry: its windows are copied, not encoded again
            old = (np.load(folder / "ids.npy"), np.load(folder / "states.npy", mmap_mode="r"))
        have = old[0] if old is not None else np.empty(0, dtype=np.int64)
        ids = np.union1d(have, needed)  # (K,) sorted
        todo = np.setdiff1d(ids, have)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".states.npy.*.tmp"):  # left by a killed build (this one holds the lock)
            stale.unlink(missing_ok=True)
        started, shown = time.monotonic(), 0
        with writing_path(folder / "states.npy", "the hidden-state cache") as tmp:
            states = None
            for i in range(0, len(todo), batch_size):
                chunk = todo[i:i + batch_size]
                z = encode(windows(chunk)).to("cpu")  # (k, T, D)
                if states is None:
                    states = _open(tmp, z.dtype, (len(ids), *z.shape[1:]))
                states[np.searchsorted(ids, chunk)] = z.numpy()
                done = i + len(chunk)
                if report is not None and 8 * done // len(todo) > shown:
                    shown = 8 * done // len(todo)
                    rate = done / max(time.monotonic() - started, 1e-9)
                    report(f"hidden-state cache: {done:,}/{len(todo):,} windows through the frozen backbone "
                           f"({rate:.1f} windows/s)")
            if states is None:  # nothing new to encode
                states = np.lib.format.open_memmap(tmp, mode="w+", dtype=old[1].dtype,
                                                   shape=(len(ids), *old[1].shape[1:]))
            if len(have):
                states[np.searchsorted(ids, have)] = old[1]
            states.flush()
            del states
        with writing(folder / "ids.npy", "the hidden-state cache") as f:
            np.save(f, ids)
        if report is not None:
            report(f"hidden-state cache: {len(ids):,} windows in {folder} ({len(todo):,} encoded in "
                   f"{time.monotonic() - started:.0f} s)")
        return [folder / "ids.npy", folder / "states.npy"], {"windows": int(len(ids))}

    cached_entry(manifest, build, f"the hidden-state cache '{folder}'")
    entry = HiddenStates(folder)
    if not entry.covers(needed):  # another process built a smaller entry while this one waited
        print(f"note: the hidden-state cache '{folder}' was built for fewer windows; extending it",
              file=sys.stderr)
        return ensure_states(folder, needed, windows, encode, batch_size, report)
    return entry


def _open(path: Path, dtype: torch.dtype, shape: tuple) -> np.ndarray:
    """A new .npy memory map for states of this torch dtype."""
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16}.get(dtype)
    if np_dtype is None:
        raise TypeError(f"hidden states of dtype {dtype} cannot be cached; the trunk should return float32 "
                        f"or float16")
    return np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=shape)
