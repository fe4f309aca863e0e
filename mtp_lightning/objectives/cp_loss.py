"""The CP multi-token objective, computed without holding n*r vocabulary-sized tensors (docs/method.md,
"Training objective").

Everything the objective and its diagnostics need is one small tensor,

    L[t, s, a] = log P_a^(s)(y_{t,s})      (positions, offsets, experts)

plus the router's log-weights log w[t, a]. The joint NLL, each offset's marginal NLL, the posterior
responsibilities and the balancing losses all derive from these two. ``target_logprob`` computes L
chunk by chunk: its backward recomputes each chunk's logits instead of storing them (the sequential-head
idea of Gloeckle et al.), so the loss's memory is that of one chunk of logits, not n*r*B*T*V.

Shape legend: N positions (batch x time), n offsets, r experts, D width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mtp_lightning.config import LossConfig
from mtp_lightning.model.heads import CPHeads


def auto_chunk(vocab_size: int) -> int:
    """Rows per chunk so that one chunk's fp32 logits stay near 64 MiB. Smaller chunks gain nothing
    measurable on one CPU thread, and with several threads on a busy machine each of their many small
    kernels can stall at its thread barrier (2 threads, 4 jobs on 2 cores: 8 MiB chunks ran 1.9x
    slower than 64 MiB ones)."""
    return max(256, (1 << 24) // max(vocab_size, 1))


def _chunk_logits(h: torch.Tensor, Um_T: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """h (C, D) @ U^T (D, V) into the first C rows of the float32 buffer buf (>= C, V); returns them.

    Writing into one reused buffer matters on CPUs: a fresh (C, V) tensor per chunk is a fresh mmap
    whose pages are faulted in and zeroed every time."""
    out = buf[: h.shape[0]]
    if h.dtype == out.dtype:
        torch.matmul(h, Um_T, out=out)
    else:  # bf16 products, float32 log-softmax
        out.copy_(h @ Um_T)
    return out


class _TargetLogprob(torch.autograd.Function):
    """log_softmax(h @ U.T)[target] per row, in chunks, with recomputation in backward.

    Returns exactly the straightforward value; gradients are (onehot - softmax) * g mapped back
    through the product, also chunk by chunk. Forward does one (C, V) product per chunk, backward
    three (the recomputed logits, then grad_h and grad_U): 4/3 of the FLOPs of holding the logits.
    Every (C, V) intermediate is computed in place in one buffer.
    """

    @staticmethod
    def forward(ctx, h, U, target, chunk: int, bf16: bool, frozen_rows: int):
        with torch.autocast(device_type=h.device.type, enabled=False):
            mm = torch.bfloat16 if bf16 else torch.float32
            hm, Um_T = h.to(mm), U.to(mm).T  # (M, D), (D, V)
            out = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)  # (M,)
            lse = torch.empty_like(out)
            buf = torch.empty(min(chunk, h.shape[0]), U.shape[0], device=h.device, dtype=torch.float32)  # (C, V)
            for i in range(0, h.shape[0], chunk):
                logits = _chunk_logits(hm[i:i + chunk], Um_T, buf)  # (C, V)
                out[i:i + chunk] = logits.gather(1, target[i:i + chunk, None])[:, 0]
                m = logits.amax(dim=1, keepdim=True)  # (C, 1)
                # logsumexp in place: the buffer is overwritten by exp(logits - max)
                lse[i:i + chunk] = logits.sub_(m).exp_().sum(dim=1).log_().add_(m[:, 0])
            out.sub_(lse)
        ctx.save_for_backward(h, U, target, lse)
        ctx.chunk, ctx.mm, ctx.frozen_rows = chunk, mm, frozen_rows
        return out

    @staticmethod
    def backward(ctx, g):
        h, U, target, lse = ctx.saved_tensors
        mm, chunk, f = ctx.mm, ctx.chunk, ctx.frozen_rows
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_U = torch.zeros(U.shape, device=U.device, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        with torch.autocast(device_type=h.device.type, enabled=False):
            hm, Um = h.to(mm), U.to(mm)  # (M, D), (V, D)
            buf = torch.empty(min(chunk, h.shape[0]), U.shape[0], device=h.device, dtype=torch.float32)  # (C, V)
            g = g.float()
            for i in range(0, h.shape[0], chunk):
                hc, gc = hm[i:i + chunk], g[i:i + chunk, None]  # (C, D), (C, 1)
                G = _chunk_logits(hc, Um.T, buf)  # (C, V)
                G.sub_(lse[i:i + chunk, None]).exp_().mul_(-gc)  # -softmax * g
                G.scatter_add_(1, target[i:i + chunk, None], gc)  # + onehot * g
                if mm == torch.float32:
                    if grad_h is not None:
                        if grad_h.dtype == torch.float32:
                            torch.matmul(G, Um, out=grad_h[i:i + chunk])  # (C, D)
                        else:
                            grad_h[i:i + chunk] = G @ Um
                    if grad_U is not None:  # rows below f need none: only the rest's (small) product
                        grad_U[f:].addmm_(G[:, f:].T, hc)  # (V - f, D)
                else:
                    Gm = G.to(mm)
                    if grad_h is not None:
                        grad_h[i:i + chunk] = (Gm @ Um).to(h.dtype)
                    if grad_U is not None:
                        grad_U[f:] += (Gm[:, f:].T @ hc).float()
        return grad_h, None if grad_U is None else grad_U.to(U.dtype), None, None, None, None


def target_logprob(h: torch.Tensor, U: torch.Tensor, target: torch.Tensor, chunk: int = 0,
                   lean: bool = True, bf16: bool = False, frozen_rows: int = 0) -> torch.Tensor:
    """log softmax(h @ U.T)[target]: h (M, D), U (V, D), target (M,) -> (M,) float32.

    ``frozen_rows``: U's first rows get a zero gradient, without its product (a frozen unembedding's
    draft rows with a learned "other" row after them, ``CPModel.head_frozen_rows``); lean loss only."""
    if lean:
        return _TargetLogprob.apply(h, U, target, chunk or auto_chunk(U.shape[0]), bf16, frozen_rows)
    mm = torch.bfloat16 if bf16 else h.dtype
    logits = (h.to(mm) @ U.to(mm).T).float()  # (M, V): the naive path holds them all
    return logits.log_softmax(-1).gather(1, target[:, None])[:, 0]


@dataclass
class CPTerms:
    """What one batch's objective produced. Scalars are 0-dim tensors (no host syncs)."""

    loss: torch.Tensor
    joint_nll: torch.Tensor  # mean over positions of -log P(y_1..y_n)
    offset_nll: torch.Tensor  # (n,) NLL of each offset's marginal; [0] is the next-token NLL
    balance: torch.Tensor
    lm_head_nll: torch.Tensor | None
    token_nll: torch.Tensor  # (N,) next-token NLL per position (for bits per byte)
    log_w: torch.Tensor  # (N', r) router log-weights at the positions of the joint loss
    posterior: torch.Tensor  # (N', r) responsibilities gamma


def factor_logprobs(heads: CPHeads, states: list[torch.Tensor], U: torch.Tensor, targets: torch.Tensor,
                    offsets: range, cfg: LossConfig, frozen_rows: int = 0) -> torch.Tensor:
    """L[t, s, a] for the offsets asked: states n x (N, D), targets (N, n) -> (N, len(offsets), r)."""
    cols = []
    for s in offsets:
        h = heads.expert_vectors(states[s], s)  # (N, r, D)
        N, r, D = h.shape
        tgt = targets[:, s, None].expand(N, r).reshape(N * r)
        cols.append(target_logprob(h.reshape(N * r, D), U, tgt, cfg.chunk_size, cfg.lean,
                                   cfg.bf16_unembed, frozen_rows).view(N, r))
    return torch.stack(cols, dim=1)  # (N, len(offsets), r)


def balance_loss(log_w: torch.Tensor, posterior: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Auxiliary load-balancing loss over the batch's positions; log_w, posterior (N, r)."""
    r = log_w.shape[-1]
    if cfg.balance == "none" or r == 1:
        return log_w.new_zeros(())
    w = log_w.exp()
    if cfg.balance == "switch":
        # Switch Transformer: r * sum_a f_a * P_a; f_a (a hard count) carries no gradient, P_a does
        choice = (posterior if cfg.switch_assign == "posterior" else w).argmax(-1)
        f = F.one_hot(choice, r).float().mean(0)  # (r,)
        return r * (f * w.mean(0)).sum()
    importance = w.sum(0)  # (r,)  Shazeer et al.: squared coefficient of variation of importance
    return importance.var(unbiased=False) / importance.mean().pow(2)


def cp_objective(heads: CPHeads, z: torch.Tensor, states: list[torch.Tensor], U: torch.Tensor,
                 targets: torch.Tensor, cfg: LossConfig, generator: torch.Generator | None = None,
                 lm_U: torch.Tensor | None = None, lm_targets: torch.Tensor | None = None,
                 frozen_rows: int = 0, factors: torch.Tensor | None = None) -> CPTerms:
    """z (B, T, D), states n x (B, T, D), targets (B, T, n) with targets[b, t, s] = x_{t+s+1}.

    U and targets are the heads' vocabulary: the full U and token ids, or with a draft vocabulary
    (``draft_vocab.py``) U[draft_ids] plus the "other" row (V' + 1, D) and the targets' classes
    (``CPModel.head_unembedding(other=True)``, ``head_targets``). The plain next-token head
    (``lm_head_weight``) always covers the full vocabulary: ``lm_U`` (V, D) and ``lm_targets`` (B, T, n)
    token ids, which default to U and targets. ``frozen_rows``: see ``target_logprob``. ``factors``
    (N, n, r): L already computed at every position by the same products (the distillation's,
    ``distill_objective``), instead of computing it here; only with ``position_fraction`` 1."""
    B, T, n = targets.shape
    N = B * T
    z2 = z.reshape(N, -1)  # (N, D)
    st = [u.reshape(N, -1) for u in states]
    tg = targets.reshape(N, n)
    log_w_all = heads.router_logits(z2).float().log_softmax(-1)  # (N, r)

    if factors is not None:
        assert cfg.position_fraction == 1.0 and factors.shape == (N, n, heads.r), tuple(factors.shape)
        L = factors
        log_w = log_w_all
        token_lp = None
    elif cfg.position_fraction < 1.0:
        # the multi-token terms see a random subset of positions; the next-token term sees them all
        m = max(1, int(round(cfg.position_fraction * N)))
        keep = torch.randperm(N, device=z.device, generator=generator)[:m]
        L0 = factor_logprobs(heads, st, U, tg, range(1), cfg, frozen_rows)  # (N, 1, r)
        rest = factor_logprobs(heads, [u[keep] for u in st], U, tg[keep], range(1, n), cfg, frozen_rows)
        L = torch.cat([L0[keep], rest], dim=1)  # (m, n, r)
        log_w = log_w_all[keep]
        token_lp = torch.logsumexp(log_w_all + L0[:, 0], dim=-1)  # (N,)
    else:
        L = factor_logprobs(heads, st, U, tg, range(n), cfg, frozen_rows)  # (N, n, r)
        log_w = log_w_all
        token_lp = None

    joint_a = log_w + L.sum(1)  # (N', r): log w_a + sum_s log P_a^(s)(y_s)
    joint_lp = torch.logsumexp(joint_a, dim=-1)  # (N',)
    offset_lp = torch.logsumexp(log_w[:, None, :] + L, dim=-1)  # (N', n)
    if token_lp is None:
        token_lp = offset_lp[:, 0]
    posterior = torch.softmax(joint_a.detach(), dim=-1)  # (N', r)

    joint_nll = -joint_lp.mean()
    offset_nll = -offset_lp.mean(0)  # (n,)
    next_nll = -token_lp.mean()
    offset_nll = torch.cat([next_nll[None], offset_nll[1:]])
    aux = balance_loss(log_w, posterior, cfg)
    loss = joint_nll + cfg.balance_weight * aux
    if cfg.next_token_weight > 0:
        loss = loss + cfg.next_token_weight * next_nll
    lm_nll = None
    if cfg.lm_head_weight > 0:
        lm_tg = tg[:, 0] if lm_targets is None else lm_targets.reshape(N, n)[:, 0]
        lm_lp = target_logprob(z2, U if lm_U is None else lm_U, lm_tg, cfg.chunk_size, cfg.lean,
                               cfg.bf16_unembed)  # (N,)
        lm_nll = -lm_lp.mean()
        loss = loss + cfg.lm_head_weight * lm_nll
    return CPTerms(loss=loss, joint_nll=joint_nll, offset_nll=offset_nll, balance=aux,
                   lm_head_nll=lm_nll, token_nll=-token_lp, log_w=log_w.detach(), posterior=posterior)


def mixture_health(log_w: torch.Tensor, posterior: torch.Tensor) -> dict[str, torch.Tensor]:
    """Router statistics over positions; log_w, posterior (N, r). Tensors, for logging without syncs."""
    r = log_w.shape[-1]
    w = log_w.exp()
    mean_w = w.mean(0)  # (r,)
    wins = F.one_hot(w.argmax(-1), r).float().mean(0)  # (r,)
    entropy = -(w * log_w).sum(-1).mean()
    return {
        "expert_weight": mean_w,
        "expert_wins": wins,
        "expert_posterior": posterior.mean(0),
        "router_entropy": entropy,
        "busiest_share": wins.max(),
        # an expert is dead when its mean router weight falls below a tenth of the uniform share
        "dead_experts": (mean_w < 0.1 / r).sum().float(),
    }
