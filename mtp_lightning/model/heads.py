"""Rank-r CP heads: a router and n x r factor heads over one shared unembedding (METHOD.md §1).

    P(x_{t+1..t+n} | z_t) = sum_a w_a(z_t) prod_s softmax(U h_{s,a}(z_t))[x_{t+s}]

This module produces the router logits and the d-vectors h_{s,a}(z); it never multiplies by U. The
loss (``cp_loss.py``) and the decoder do, each computing only the (offset, expert, position) products
it needs, because those products are what multi-token heads cost.

Head kinds (``model.heads.kind``):
- ``linear``: h_{s,a}(z) = W_{s,a} z, with W initialised near the identity;
- ``mlp``: h_{s,a}(z) = z + SiLU(W_{s,a} z), a residual layer per factor (Medusa-style);
- ``block``: one transformer layer per offset s on the trunk's sequence (Gloeckle-style), then a
  linear map to r vectors. These layers attend over past positions, so they use KV-cache slots after
  the trunk's.

Shape legend: B batch, T positions, D width, n offsets, r experts.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtp_lightning.config import GPTConfig, HeadsConfig
from mtp_lightning.model import fastpath
from mtp_lightning.model.gpt import Block, KVCache


class CPHeads(nn.Module):
    def __init__(self, heads: HeadsConfig, trunk: GPTConfig, first_cache_layer: int = 0):
        super().__init__()
        n, r, D = heads.n_future, heads.rank, trunk.d_model
        self.n, self.r, self.d, self.kind = n, r, D, heads.kind
        self.router = nn.Linear(D, r, bias=False)
        nn.init.normal_(self.router.weight, std=heads.router_init_std)
        if heads.kind == "linear":
            # (n, r, D, D): starts at the identity plus noise, so every factor begins as a next-token
            # predictor and the experts differ from the first step
            eye = torch.eye(D).expand(n, r, D, D)
            self.weight = nn.Parameter(eye + 0.02 * torch.randn(n, r, D, D))
        elif heads.kind == "mlp":
            self.weight = nn.Parameter(0.02 * torch.randn(n, r, D, D))  # (n, r, D_out, D_in)
        elif heads.kind == "block":
            self.blocks = nn.ModuleList([Block(trunk, first_cache_layer + s) for s in range(n)])
            self.norms = nn.ModuleList([nn.LayerNorm(D, bias=trunk.bias) for _ in range(n)])
            eye = torch.eye(D).expand(n, r, D, D)
            self.weight = nn.Parameter(eye + 0.02 * torch.randn(n, r, D, D))  # (n, r, D_out, D_in)
        else:
            raise ValueError(f"unknown head kind {heads.kind!r}")

    @property
    def n_cache_layers(self) -> int:
        return self.n if self.kind == "block" else 0

    def router_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., r). With r = 1 the softmax is the constant 1, as METHOD.md asks."""
        return self.router(z)

    def offset_states(self, z: torch.Tensor, cache: KVCache | None = None) -> list[torch.Tensor]:
        """Per-offset inputs of the factor maps: n tensors (B, T, D). Only ``block`` heads run the
        sequence here (and must see every position, to keep their caches whole)."""
        if self.kind != "block":
            return [z] * self.n
        return [norm(block(z, cache)) for block, norm in zip(self.blocks, self.norms)]

    def expert_vectors(self, u: torch.Tensor, s: int, experts: slice | None = None) -> torch.Tensor:
        """h_{s,a} for offset index s (0-based) from its state u (..., D) -> (..., r, D)."""
        if experts is None and fastpath.applies(u):  # decoding: a few rows through a transposed copy
            h = (u @ fastpath.transposed(self.weight, s)).unflatten(-1, (self.r, self.d))  # (..., r, D)
        else:
            W = self.weight[s]  # (r, D_out, D_in)
            if experts is not None:
                W = W[experts]
            h = torch.einsum("rod,...d->...ro", W, u)  # (..., r, D)
        if self.kind == "mlp":
            return u.unsqueeze(-2) + F.silu(h)
        return h
