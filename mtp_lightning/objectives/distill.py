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
The same chunks also give the CP objective its factor log-probabilities L[t, s, a] = log P_a^(s)(y_s)
at every position (``DistillTerms.factors``, for ``cp_objective(factors=...)``): the products
U h_{s,a} are the cost of both objectives, and this way each is paid once (forward, recomputation and
the gradient of h: three products per factor and position, the 6 n r N V D floor).

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
    factors: torch.Tensor  # (B * T, n, r) log P_a^(s)(y_s) at every position, for cp_objective


def offset_weights(n: int, gamma: float, device=None) -> torch.Tensor:
    """(n,) gamma^(s-1) / sum gamma^(s-1) for s = 1..n."""
    w = gamma ** torch.arange(n, dtype=torch.float32, device=device)
    return w / w.sum()


def _chunk(heads: CPHeads, U: torch.Tensor, s: int, bf16: bool, kl_cols: int, frozen: bool,
           u: torch.Tensor, z: torch.Tensor, logp: torch.Tensor, y: torch.Tensor, valid: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Offset index s over one chunk: u, z (C, D), the base log-probs logp (C, V), y (C,) and valid (C,)
    (1 where the base distribution lies inside the window) -> summed KL and CE over the valid rows,
    and L (C, r), log P_a^(s)(y) at every row."""
    logw = heads.router_logits(z).float().log_softmax(-1)  # (C, r)
    h = heads.expert_vectors(u, s)  # (C, r, D)
    mm = torch.bfloat16 if bf16 else torch.float32
    with torch.autocast(device_type=u.device.type, enabled=False):
        if frozen:  # the frozen V' rows apart from the learned "other" row: no gradient product for them
            logits = torch.cat([h.to(mm) @ U[:kl_cols].detach().to(mm).T, h.to(mm) @ U[kl_cols:].to(mm).T], -1)
        else:
            logits = h.to(mm) @ U.to(mm).T
        lp = logits.float().log_softmax(-1)  # (C, r, V) (V' + 1 with a draft vocabulary)
        factors = lp.gather(2, y[:, None, None].expand(-1, lp.shape[1], 1))[..., 0]  # (C, r)
        logq = torch.logsumexp(logw[..., None] + lp, dim=1)  # (C, V) the offset's marginal
    # a draft vocabulary: the KL compares the two distributions renormalised over the V' ids
    logq_kl = logq[:, :kl_cols].log_softmax(-1) if kl_cols else logq  # (C, V')
    kl = (logp.exp() * (logp - logq_kl)).sum(-1)  # (C,)
    ce = -logq.gather(1, y[:, None])[:, 0]  # (C,)
    return (kl * valid).sum(), (ce * valid).sum(), factors


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
    N = B * T
    chunk = max(1, (cfg.chunk_size or auto_chunk(U.shape[0])) // heads.r)
    with torch.no_grad():  # the base model's next-token log-probs, once per position
        logp = base_logits(base_z.detach().reshape(N, D)).float().log_softmax(-1).view(B, T, -1)  # (B, T, V)
    positions = torch.arange(T, device=z.device)
    zz = z.reshape(N, D)
    kls, ces, factors = [], [], []
    for s in range(n):
        # position t's base distribution for offset s is the base model's at t + s: inside the window
        # for t < T - s only; the rows past it still give the CP objective its factors
        lp_s = logp[:, (positions + s).clamp(max=T - 1)].reshape(N, -1)  # (N, V)
        valid = (positions < T - s).to(torch.float32).expand(B, T).reshape(N)  # (N,)
        u = states[s].reshape(N, D)
        y = targets[:, :, s].reshape(N)  # (N,)
        fn = partial(_chunk, heads, U, s, cfg.bf16_unembed, kl_cols, bool(kl_cols and frozen_rows))
        kl = ce = z.new_zeros((), dtype=torch.float32)
        cols = []
        for i in range(0, N, chunk):
            args = (u[i:i + chunk], zz[i:i + chunk], lp_s[i:i + chunk], y[i:i + chunk], valid[i:i + chunk])
            if cfg.lean and torch.is_grad_enabled():
                kl_c, ce_c, f_c = checkpoint(fn, *args, use_reentrant=False)
            else:
                kl_c, ce_c, f_c = fn(*args)
            kl, ce = kl + kl_c, ce + ce_c
            cols.append(f_c)
        count = B * (T - s)
        kls.append(kl / count)
        ces.append(ce / count)
        factors.append(torch.cat(cols))  # (N, r)
    kl, ce = torch.stack(kls), torch.stack(ces)  # (n,), (n,)
    beta = cfg.distill_beta
    loss = (offset_weights(n, cfg.distill_gamma, z.device) * (beta * kl + (1 - beta) * ce)).sum()
    return DistillTerms(loss=loss, kl=kl, ce=ce, factors=torch.stack(factors, dim=1))  # (N, n, r)
