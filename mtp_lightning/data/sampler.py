"""The training order: seeded, reshuffled each pass, sharded across ranks, resumable exactly.

The global sample stream is pass 0's permutation of the window ids, then pass 1's, and so on; pass p is
``randperm(n_items)`` from a generator seeded with ``seed + p``. Global batch g is stream samples
``[g*B, (g+1)*B)`` (a batch may straddle two passes, so no window is ever dropped). Rank r of W takes
global batches ``r, r + W, r + 2W, ...`` counted from ``start_sample``, so one process with k-step
accumulation and k processes see the same batches per optimizer step, in the same order.

Resuming is a matter of where the stream starts: after ``s`` optimizer steps with accumulation a, every
rank has used ``s * a`` batches, and ``start_sample = s * a * B * W``. Nothing else needs saving.

Length and Lightning: on resume, Lightning restores how many batches of the current epoch are done
(``skip``) and counts the epoch as over when that count reaches ``len(sampler)``. So ``__len__`` is the
length of the whole epoch and an iteration yields only ``length - skip`` batches, the ones not yet
seen. After a full iteration the sampler moves its start past what it yielded, so a second epoch
continues the stream instead of repeating it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    def __init__(self, n_items: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 start_sample: int = 0, length: int | None = None, skip: int = 0):
        """``length``: batches per epoch for this rank (None: one pass over the data, at least 1);
        ``skip``: batches of this epoch already done (the iteration yields ``length - skip``)."""
        assert n_items >= 1 and batch_size >= 1, (n_items, batch_size)
        assert 0 <= rank < world_size, (rank, world_size)
        self.n_items = n_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_sample = start_sample
        self.length = length if length is not None else max(1, n_items // (batch_size * world_size))
        self.skip = min(max(skip, 0), self.length)
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.length

    def _perm(self, p: int) -> torch.Tensor:
        """Pass p's order (n_items,); the last two are kept, as a batch spans at most two passes."""
        if p not in self._perms:
            g = torch.Generator().manual_seed(self.seed + p)
            self._perms = {k: v for k, v in self._perms.items() if k >= p - 1}
            self._perms[p] = torch.randperm(self.n_items, generator=g)
        return self._perms[p]

    def global_batch(self, g: int) -> list[int]:
        """Global batch g counted from ``start_sample``: B window ids."""
        first = self.start_sample + g * self.batch_size
        out: list[int] = []
        while len(out) < self.batch_size:
            p, pos = divmod(first + len(out), self.n_items)
            take = min(self.batch_size - len(out), self.n_items - pos)
            out += self._perm(p)[pos : pos + take].tolist()
        return out

    def __iter__(self) -> Iterator[list[int]]:
        todo = self.length - self.skip
        for k in range(todo):
            yield self.global_batch(k * self.world_size + self.rank)
        # only reached when the epoch was used up: the next iteration carries on from here
        self.start_sample += todo * self.batch_size * self.world_size
        self.skip = 0
