"""Per-offset distillation of the CP heads to a frozen base model (docs/method.md, "Distillation to a
frozen base model").

For a position t and offset s (1-based), with q_s the CP model's marginal for offset s at t,

    q_s(x) = sum_a w_a(z_t) P_a^(s)(x | z_t),

and p_base,s the frozen base model's next-token distribution at position t+s-1 (the distribution the
base model itself gives the token x_{t+s} once it has read x_<=t+s-1),

    L_s = beta * KL(p_base,s || q_s) + (1 - beta) * CE(q_s, y_s),      L = sum_s g_s L_s,
    g_s = gamma^(s-1) / sum_s' gamma^(s'-1).

Worked example (T = 4 inputs, n = 2): offset 1 pairs q_1 at t = 0..3 with p_base at 0..3; offset 2
pairs q_2 at t = 0..2 with p_base at 1..3 (t = 3 would need position 4, past the window, so it is left
out). Each L_s is a mean over its own positions.

KL needs the whole vocabulary of q_s, so q_s is built chunk by chunk of positions; with ``lean`` each
chunk runs under activation checkpointing, so memory holds one chunk's (C, r, V) logits, not all.

Shape legend: B batch, T positions, N = B * (T - s + 1) positions of offset s, C positions per chunk,
D width, r experts, V vocabulary, n offsets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from mtp_lightning.config import LossConfig
from mtp_lightning.objectives.cp_loss import auto_chunk
from mtp_lightning.model.heads import CPHeads


@dataclass
class DistillTerms:
    loss: torch.Tensor  # sum_s g_s L_s (0-dim)
    kl: torch.Tensor  # (n,) KL(p_base,s || q_s), mean over positions
    ce: torch.Tensor  # (n,) CE(q_s, y_s), mean over positions


def offset_weights(n: int, gamma: float, device=None) -> torch.Tensor:
    """(n,) gamma^(s-1) / sum gamma^(s-1) for s = 1..n."""
    w = gamma ** torch.arange(n, dtype=torch.float32, device=device)
    return w / w.sum()


def _chunk(heads: CPHeads, U: torch.Tensor, base_logits: Callable, s: int, bf16: bool, kl_cols: int, frozen: bool,
           u: torch.Tensor, z: torch.Tensor, zb: torch.Tensor, y: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KL and CE of offset index s over one chunk: u, z, zb (C, D), y (C,)."""
    logw = heads.router_logits(z).float().log_softmax(-1)  # (C, r)
    h = heads.expert_vectors(u, s)  # (C, r, D)
    mm = torch.bfloat16 if bf16 else torch.float32
    with torch.autocast(device_type=u.device.type, enabled=False):
        if frozen:  # the frozen V' rows apart from the learned "other" row: no gradient product for them
            logits = torch.cat([h.to(mm) @ U[:kl_cols].detach().to(mm).T, h.to(mm) @ U[kl_cols:].to(mm).T], -1)
        else:
            logits = h.to(mm) @ U.to(mm).T
        lp = logits.float().log_softmax(-1)  # (C, r, V) (V' + 1 with a draft vocabulary)
        logq = torch.logsumexp(logw[..., None] + lp, dim=1)  # (C, V) the offset's marginal
    # a draft vocabulary: the KL compares the two distributions renormalised over the V' ids
    logq_kl = logq[:, :kl_cols].log_softmax(-1) if kl_cols else logq  # (C, V')
    with torch.no_grad():
        logp = base_logits(zb).float().log_softmax(-1)  # (C, V) the frozen base model (V': those rows)
    kl = (logp.exp() * (logp - logq_kl)).sum(-1)  # (C,)
    ce = -logq.gather(1, y[:, None])[:, 0]  # (C,)
    return kl.sum(), ce.sum()


def distill_objective(heads: CPHeads, z: torch.Tensor, states: list[torch.Tensor], U: torch.Tensor,
                      base_z: torch.Tensor, base_logits: Callable[[torch.Tensor], torch.Tensor],
                      targets: torch.Tensor, cfg: LossConfig, kl_cols: int = 0, frozen_rows: int = 0
                      ) -> DistillTerms:
    """z (B, T, D) and states n x (B, T, D) of the CP model; base_z (B, T, D) the base model's hidden
    states and ``base_logits`` its output layer (..., D) -> (..., V), both used without gradients;
    targets (B, T, n) with targets[b, t, s] = x_{t+s+1}.

    ``kl_cols`` = V' > 0: a draft vocabulary (``draft_vocab.py``). U is then U[draft_ids] plus the
    "other" row (V' + 1, D), targets are the heads' classes, and ``base_logits`` gives the base model's
    logits at the V' ids only (..., V'): the KL is KL(p_base|V' || q_s|V'), both renormalised over the
    V' ids (no full-vocabulary product); the CE is over the V' + 1 classes. ``frozen_rows`` = V' (a
    frozen unembedding): those rows of U get no gradient, and no product is spent on one."""
    B, T, n = targets.shape
    D = z.shape[-1]
    chunk = max(1, (cfg.chunk_size or auto_chunk(U.shape[0])) // heads.r)
    kls, ces = [], []
    for s in range(n):
        M = T - s  # positions t whose base distribution at t+s is inside the window
        u = states[s][:, :M].reshape(-1, D)  # (N, D)
        zz = z[:, :M].reshape(-1, D)
        zb = base_z[:, s:].detach().reshape(-1, D)
        y = targets[:, :M, s].reshape(-1)  # (N,)
        fn = partial(_chunk, heads, U, base_logits, s, cfg.bf16_unembed, kl_cols, bool(kl_cols and frozen_rows))
        kl = ce = z.new_zeros((), dtype=torch.float32)
        for i in range(0, y.shape[0], chunk):
            args = (u[i:i + chunk], zz[i:i + chunk], zb[i:i + chunk], y[i:i + chunk])
            if cfg.lean and torch.is_grad_enabled():
                kl_c, ce_c = checkpoint(fn, *args, use_reentrant=False)
            else:
                kl_c, ce_c = fn(*args)
            kl, ce = kl + kl_c, ce + ce_c
        kls.append(kl / y.shape[0])
        ces.append(ce / y.shape[0])
    kl, ce = torch.stack(kls), torch.stack(ces)  # (n,), (n,)
    beta = cfg.distill_beta
    loss = (offset_weights(n, cfg.distill_gamma, z.device) * (beta * kl + (1 - beta) * ce)).sum()
    return DistillTerms(loss=loss, kl=kl, ce=ce)
