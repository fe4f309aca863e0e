"""Stub models for the decoding tests: hand-written factor tables (offset s predicts a fixed function of
the current token), so that the tokens and counts speculative decoding must produce are known exactly.
Shared by test_decoding.py, test_tree.py and test_tree_sampling.py (a helper module, not a test module)."""

from __future__ import annotations

import torch
import torch.nn as nn

from mtp_lightning.model.gpt import KVCache


class StubModel(nn.Module):
    """Hand-written logits over V tokens. The state of a position is one-hot of its token x.

    Verifier: the next token is always x + 1 (mod V). Factor (offset s, expert a) puts its mass on
    ``tables[a][s - 1](x)``. Only the calls the decoders make are implemented."""

    n_future, max_seq_len = 4, 64

    def __init__(self, tables, log_w=(0.0,), V: int = 10, peak: float = 30.0):
        super().__init__()
        self.tables, self.V, self.peak = tables, V, peak
        self.log_w = torch.tensor(log_w).log_softmax(-1)  # (r,)
        self.rank = len(tables)
        self.unembedding = nn.Parameter(torch.zeros(V, 1))

    def _peaked(self, target: torch.Tensor) -> torch.Tensor:  # (...) -> (..., V)
        return (self.peak * nn.functional.one_hot(target, self.V).float()).log_softmax(-1)

    def forward(self, idx):
        z = nn.functional.one_hot(idx, self.V).float()  # (B, T, V)
        return z, [z] * self.n_future

    def new_cache(self, batch, max_len):
        return KVCache(1, batch, 1, max_len, 1, torch.device("cpu"), torch.float32)

    def extend(self, idx, cache, pad_mask=None):
        cache.prepare(torch.ones_like(idx, dtype=torch.bool) if pad_mask is None else pad_mask)  # bounds check
        cache.advance(idx.shape[1])
        return self(idx)

    def router_logw(self, z):
        return self.log_w.expand(*z.shape[:-1], self.rank)

    def factor_logprobs(self, states, offsets, probs=False, int8=False, raw=False):
        x = states[0].argmax(-1)  # (...)
        per = [torch.stack([self._peaked(table[s](x)) for table in self.tables], -2) for s in offsets]
        lp = torch.stack(per, -3)  # (..., k, r, V): log-probs, which are also valid raw logits
        return lp.exp() if probs and not raw else lp

    def verifier_logprobs(self, z, states, verifier):
        return self._peaked((z.argmax(-1) + 1) % self.V)

    def verifier_and_factors(self, z, states, verifier, probs=False):
        lp = self.verifier_logprobs(z, states, verifier)
        return (lp.exp() if probs else lp), None


def chain(offset_shift):
    """Factor tables whose offset s predicts x + s + offset_shift(s) (mod 10); shift 0 is right."""
    return [lambda x, s=s: (x + s + offset_shift(s)) % 10 for s in range(1, 5)]


ALWAYS = chain(lambda s: 0)
NEVER = chain(lambda s: 0 if s == 1 else 5)
PARTLY = chain(lambda s: 0 if s <= 2 else 5)  # offset 2 right, offsets 3+ wrong: one draft per step


class TreeStub(StubModel):
    """``StubModel`` whose ``extend`` takes a tree mask; its states depend on the token alone."""

    def extend(self, idx, cache, pad_mask=None, tree=None):
        cache.prepare(torch.ones_like(idx, dtype=torch.bool) if pad_mask is None else pad_mask, tree)
        cache.advance(idx.shape[1])
        return self(idx)
