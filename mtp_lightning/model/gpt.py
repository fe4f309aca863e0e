"""The GPT trunk: a small pre-norm causal transformer, written for multi-token heads.

What is particular about it:
- It returns hidden states, not logits. The heads (``heads.py``) and the loss (``cp_loss.py``) own the
  unembedding, so the trunk never materialises a vocabulary-sized tensor it does not need.
- Embeddings are tied: ``wte.weight`` is the unembedding U shared by every (offset, expert) factor.
- Attention goes through ``scaled_dot_product_attention``. Training uses its causal fast path; decoding
  passes a ``KVCache`` whose rows may hold different lengths, so a batch of speculative decodes can
  accept different numbers of tokens per row and prompts can be left-padded. A one-row pass may carry
  a ``TreeMask`` (tree verification, ``decoding/tree.py``): each new token then sees only its ancestors
  among the new tokens and takes its depth as its position; ``KVCache.keep`` keeps the accepted path.

Shape legend: B batch, T new tokens, S cache slots, D model width, H heads, K head width, V vocabulary.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtp_lightning.config import GPTConfig
from mtp_lightning.model.fastpath import Linear


class TreeMask(NamedTuple):
    """How the T tokens of one tree-verification pass see each other (``decoding/tree.py``)."""

    ancestors: torch.Tensor
    """(T, T) bool: token i attends to new token j iff j is i or one of its ancestors."""
    depth: torch.Tensor
    """(T,) long: token i's position is the first new token's plus depth[i]."""


class KVCache:
    """Key/value buffers for every attention layer, with one fill length per row.

    A row's slots ``[0, lengths[b])`` are written; ``valid[b, j]`` says whether slot j holds a real
    token (False for left padding). ``crop`` moves the lengths back after a rejected draft; the stale
    slots are overwritten by the next write and are never attended to before that.
    """

    def __init__(self, n_layers: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (n_layers, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, H, S, K)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, H, S, K)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # (B, S)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)
        self.max_len = max_len
        # set by ``prepare`` for the forward pass in flight
        self.slots: torch.Tensor | None = None  # (B, T) slot index of each new token
        self.mask: torch.Tensor | None = None  # (B, 1, T, S') attention mask over the used slots
        self.used = 0  # S': slots any row uses after this pass

    def prepare(self, pad_mask: torch.Tensor, tree: TreeMask | None = None) -> torch.Tensor:
        """Reserve slots for T new tokens per row; return their positions (B, T) for the embeddings.
        ``tree`` (tree verification, one row): the new tokens see the cached prefix and their own
        ancestors instead of every earlier new token, and sit at their depth after the first one."""
        B, T = pad_mask.shape
        slots = self.lengths[:, None] + torch.arange(T, device=pad_mask.device)  # (B, T)
        if int(slots.max()) >= self.max_len:
            raise ValueError(f"KV cache of {self.max_len} slots is full")
        self.valid.scatter_(1, slots, pad_mask)
        self.used = int(slots.max()) + 1
        valid = self.valid[:, : self.used]  # (B, S')
        # a token's position counts the real tokens before it, so left padding does not shift it
        positions = (valid.long().cumsum(1) - 1).clamp(min=0).gather(1, slots)  # (B, T)
        key_idx = torch.arange(self.used, device=pad_mask.device)
        causal = key_idx[None, None, :] <= slots[:, :, None]  # (B, T, S')
        # a padding query may see no real key; letting every query see itself keeps softmax finite
        mask = (causal & valid[:, None, :]) | (key_idx[None, None, :] == slots[:, :, None])
        if tree is not None:
            assert B == 1, "a tree pass verifies one row"
            first = int(slots[0, 0])
            mask[0, :, first:first + T] = tree.ancestors
            positions = positions[:, :1] + tree.depth[None]  # (1, T)
        self.slots, self.mask = slots, mask[:, None]  # (B, 1, T, S')
        return positions

    def keep(self, first: int, slots: torch.Tensor) -> None:
        """One row: move the slots ``slots`` (n,), ascending and >= first, to first..first+n-1 and
        drop everything after them (a tree pass keeps its accepted path only)."""
        n = slots.numel()
        self.k[:, :, :, first:first + n] = self.k[:, :, :, slots]
        self.v[:, :, :, first:first + n] = self.v[:, :, :, slots]
        self.valid[:, first:first + n] = self.valid[:, slots]
        self.lengths = torch.full_like(self.lengths, first + n)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this pass's keys/values (B, H, T, K) and return all used slots (B, H, S', K)."""
        idx = self.slots[:, None, :, None].expand(-1, k.size(1), -1, k.size(3))  # (B, H, T, K)
        self.k[layer].scatter_(2, idx, k.to(self.k.dtype))
        self.v[layer].scatter_(2, idx, v.to(self.v.dtype))
        return self.k[layer, :, :, : self.used], self.v[layer, :, :, : self.used]

    def advance(self, n_new: int) -> None:
        self.lengths += n_new

    def crop(self, lengths: torch.Tensor) -> None:
        """Keep only the first ``lengths[b]`` slots of each row (B,), at most the current lengths (the
        decoders only ever shorten; not checked here, since speculative decoding crops every step)."""
        self.lengths = lengths.clone()


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.n_head, self.head_dim, self.layer = cfg.n_head, cfg.d_model // cfg.n_head, layer
        self.qkv = Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # 3 x (B, T, D)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, K)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            k_all, v_all = cache.write(self.layer, k, v)  # (B, H, S', K)
            y = F.scaled_dot_product_attention(q, k_all.to(q.dtype), v_all.to(q.dtype), attn_mask=cache.mask)
        y = y.transpose(1, 2).contiguous().view(B, T, D)  # (B, T, D)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.proj = Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer layer. ``layer`` is its slot in the KV cache."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token ids (B, T) -> final-norm hidden states z (B, T, D)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.vocab_size > 0, "vocab_size is set from the tokenizer before the model is built"
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance flat
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    @property
    def unembedding(self) -> torch.Tensor:
        return self.wte.weight  # (V, D), tied to the input embedding

    @property
    def n_cache_layers(self) -> int:
        return self.cfg.n_layer

    def new_cache(self, batch: int, max_len: int, extra_layers: int = 0, dtype=None) -> KVCache:
        p = self.wte.weight
        return KVCache(self.cfg.n_layer + extra_layers, batch, self.cfg.n_head,
                       min(max_len, self.cfg.max_seq_len), self.cfg.d_model // self.cfg.n_head,
                       p.device, dtype or p.dtype)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                pad_mask: torch.Tensor | None = None, tree: TreeMask | None = None) -> torch.Tensor:
        B, T = idx.shape
        if cache is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
            pos = torch.arange(T, device=idx.device)[None]  # (1, T)
        else:
            pad_mask = torch.ones_like(idx, dtype=torch.bool) if pad_mask is None else pad_mask
            pos = cache.prepare(pad_mask, tree)  # (B, T)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, D)
        for block in self.blocks:
            x = block(x, cache)
        return self.ln_f(x)  # (B, T, D)
