"""Rank-r CP heads: a router and n x r factor heads over one shared unembedding (docs/method.md,
"The model").

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
        if heads.kind not in ("linear", "mlp", "block"):
            raise ValueError(f"unknown head kind {heads.kind!r}")
        if heads.kind == "block":
            self.blocks = nn.ModuleList([Block(trunk, first_cache_layer + s) for s in range(n)])
            self.norms = nn.ModuleList([nn.LayerNorm(D, bias=trunk.bias) for _ in range(n)])
        if heads.kind == "mlp":
            w = 0.02 * torch.randn(n, r, D, D)  # (n, r, D_out, D_in)
        else:
            # linear and block: start at the identity plus noise, so every factor begins as a next-token
            # predictor and the experts differ from the first step
            w = torch.eye(D).expand(n, r, D, D) + 0.02 * torch.randn(n, r, D, D)
        # offset 1 and the draft offsets 2..n are separate parameters: offset 1 (with the router) is the
        # model's next-token distribution, which draft tuning must leave untouched
        self.next_weight = nn.Parameter(w[0].clone())  # (r, D_out, D_in)
        self.register_parameter("draft_weight", nn.Parameter(w[1:].clone()) if n > 1 else None)  # (n-1, r, D, D)
        # a draft vocabulary (``draft_vocab.py``): the V' ids the heads predict over, set from the training
        # split's token counts before training (until then the first V' ids) and saved with the heads,
        # and the logit row of the "other" class that stands for every rarer token
        self.draft_vocab = heads.draft_vocab
        if heads.draft_vocab:
            self.register_buffer("draft_ids", torch.arange(heads.draft_vocab))  # (V',)
            self.other_row = nn.Parameter(torch.zeros(D))  # (D,)

    @property
    def n_cache_layers(self) -> int:
        return self.n if self.kind == "block" else 0

    def router_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., r). With r = 1 the softmax is the constant 1 (docs/method.md, "The model")."""
        return self.router(z)

    def offset_states(self, z: torch.Tensor, cache: KVCache | None = None) -> list[torch.Tensor]:
        """Per-offset inputs of the factor maps: n tensors (B, T, D). Only ``block`` heads run the
        sequence here (and must see every position, to keep their caches whole)."""
        if self.kind != "block":
            return [z] * self.n
        return [norm(block(z, cache)) for block, norm in zip(self.blocks, self.norms)]

    def factor_weight(self, s: int) -> tuple[torch.Tensor, int | None]:
        """The parameter holding offset index s's factor maps, and its index in it (None: all of it)."""
        return (self.next_weight, None) if s == 0 else (self.draft_weight, s - 1)

    def draft_parameters(self) -> list[nn.Parameter]:
        """What draft tuning trains: the maps of offsets 2..n (and their transformer layers for
        ``block`` heads). The router and offset 1's maps, which make the verifier, are not among them."""
        params = [] if self.draft_weight is None else [self.draft_weight]
        if self.kind == "block":
            for block, norm in list(zip(self.blocks, self.norms))[1:]:
                params += list(block.parameters()) + list(norm.parameters())
        return params

    def expert_vectors(self, u: torch.Tensor, s: int, experts: slice | None = None, int8: bool = False
                       ) -> torch.Tensor:
        """h_{s,a} for offset index s (0-based) from its state u (..., D) -> (..., r, D). ``int8``: through
        an int8 weight copy when decoding (``fastpath.project_int8``; drafts only)."""
        param, index = self.factor_weight(s)
        if experts is None and fastpath.applies(u):  # decoding: a few rows through a cached weight copy
            h = (fastpath.project_int8 if int8 else fastpath.project)(u, param, index).unflatten(-1, (self.r, self.d))
        else:
            W = param if index is None else param[index]  # (r, D_out, D_in)
            if experts is not None:
                W = W[experts]
            h = torch.einsum("rod,...d->...ro", W, u)  # (..., r, D)
        if self.kind == "mlp":
            return u.unsqueeze(-2) + F.silu(h)
        return h

    def draft_vectors(self, u: torch.Tensor, first: int, count: int, int8: bool = False) -> torch.Tensor:
        """h_{s,a} for ``count`` consecutive draft offset indices from ``first`` >= 1, all from one state
        u (..., D) (``linear``/``mlp`` heads, whose offsets share the trunk's z) -> (..., count, r, D).
        Decoding's draft step: one product with the offsets' maps stacked, instead of one per offset.
        ``int8`` as in ``expert_vectors``."""
        assert self.kind != "block" and first >= 1 and first - 1 + count <= self.n - 1
        index = slice(first - 1, first - 1 + count)
        if fastpath.applies(u):
            project = fastpath.project_int8 if int8 else fastpath.project
            h = project(u, self.draft_weight, index).unflatten(-1, (count, self.r, self.d))
        else:
            h = torch.einsum("krod,...d->...kro", self.draft_weight[index], u)
        if self.kind == "mlp":
            return u[..., None, None, :] + F.silu(h)
        return h


def split_stacked_weight(state_dict: dict, prefix: str) -> None:
    """Checkpoints written before offset 1 got its own parameter stored all factor maps as one
    ``<prefix>weight`` (n, r, D, D): split it in place, so they still load for decoding and evaluation
    (``checkpoint_io.load_state``). Resuming one is refused there: its optimizer state has the old layout."""
    stacked = state_dict.pop(prefix + "weight", None)
    if stacked is not None:
        state_dict[prefix + "next_weight"] = stacked[0]
        if stacked.shape[0] > 1:
            state_dict[prefix + "draft_weight"] = stacked[1:]

