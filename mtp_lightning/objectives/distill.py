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

KL needs the whole vocabulary of q_s, so q_s is built chunk by chunk of positions, and each chunk's
gradient is derived by hand (``_OffsetTerms``): its backward recomputes the chunk's logits, so memory
holds one chunk's (C, r, V) logits, never all of them, and it makes about six passes over them where
autograd through log-softmax, logsumexp and the KL made some twenty-five. For one chunk, with
P_a = softmax(U h_a), w_a the router weights, q = sum_a w_a P_a and the base distribution p over the
K first classes (K = V' with a draft vocabulary, renormalised there; else all V),

    KL(p || q|K) = sum_x p log p - sum_{x<K} p(x) log q(x) + log S,    S = sum_{x<K} q(x)

(S = 1 without a draft vocabulary, and the log S term is then left out). With t(x) = dKL/dq(x) =
-p(x)/q(x) + 1/S for x < K and 0 past it, and g_a the gradient reaching log P_a(y) (the CP objective's
factor), the gradient of the logits is

    dloss/dlogits_a(x) = P_a(x) (w_a t(x) - w_a sum_x' P_a(x') t(x') - g_a) + g_a [x = y],

and that of log w_a is w_a sum_x P_a(x) t(x). The same chunks also give the CP objective its factor
log-probabilities L[t, s, a] = log P_a^(s)(y_s) at every position (``DistillTerms.factors``, for
``cp_objective(factors=...)``): the products U h_{s,a} are the cost of both objectives, and this way
each is paid once (forward, recomputation and the gradient of h: three products per factor and
position, the 6 n r N V D floor).

Shape legend: B batch, T positions, N = B * (T - s + 1) positions of offset s, C positions per chunk,
D width, r experts, V vocabulary, n offsets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import torch

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


def _logits(h: torch.Tensor, Um: torch.Tensor) -> torch.Tensor:
    """h (C, r, D) @ Um.T -> (C, r, V) float32, the products in Um's dtype."""
    return (h.to(Um.dtype) @ Um.T).float()


class _OffsetTerms(torch.autograd.Function):
    """One chunk of one offset: the factors L (C, r) = log P_a(y) and the model's part of the KL per
    row, -sum_{x<K} p(x) log q(x) (+ log S), from h (C, r, D), U (V, D), log w (C, r), y (C,) and the
    base log-probs (C, K). ``Um``: U in the products' dtype, converted once for all chunks (U itself
    is the input that gets a gradient). The gradient is the module docstring's; U's first
    ``frozen_rows`` rows get none (a frozen unembedding), and no product is spent on them."""

    @staticmethod
    def forward(ctx, h, U, logw, y, logp, Um, kl_cols: int, frozen_rows: int):
        with torch.autocast(device_type=h.device.type, enabled=False):
            buf = _logits(h, Um)  # (C, r, V)
            m = buf.amax(-1, keepdim=True)  # (C, r, 1)
            target = buf.gather(-1, y[:, None, None].expand(*buf.shape[:2], 1))[..., 0]  # (C, r)
            se = buf.sub_(m).exp_().sum(-1)  # (C, r); buf = exp(logits - max)
            lse = se.log() + m[..., 0]  # (C, r)
            w = logw.float().exp()  # (C, r)
            q = torch.bmm((w / se)[:, None, :], buf)[:, 0]  # (C, V) the offset's marginal
            K = kl_cols or q.shape[1]
            p = logp.exp()  # (C, K)
            S = q[:, :K].sum(-1) if kl_cols else None  # (C,)
            model_kl = -(p * q[:, :K].log()).sum(-1)  # (C,)
            if kl_cols:
                model_kl = model_kl + S.log()
        ctx.save_for_backward(h, U, Um, w, y, p, lse, q, S if kl_cols else lse.new_empty(0))
        ctx.kl_cols, ctx.frozen_rows = kl_cols, frozen_rows
        return target - lse, model_kl

    @staticmethod
    def backward(ctx, gL, gK):
        h, U, Um, w, y, p, lse, q, S = ctx.saved_tensors
        K, f, mm = ctx.kl_cols or q.shape[1], ctx.frozen_rows, Um.dtype
        C, r, D = h.shape
        with torch.autocast(device_type=h.device.type, enabled=False):
            gL = torch.zeros_like(lse) if gL is None else gL.float()  # (C, r)
            gK = torch.zeros_like(lse[:, 0]) if gK is None else gK.float()  # (C,)
            t = torch.zeros_like(q)  # (C, V) dKL/dq, zero past the first K classes
            t[:, :K] = -p / q[:, :K]
            if ctx.kl_cols:
                t[:, :K] += (1 / S)[:, None]
            t.mul_(gK[:, None])
            buf = _logits(h, Um).sub_(lse[..., None]).exp_()  # (C, r, V) P_a
            Pt = torch.bmm(buf, t[:, :, None])[..., 0]  # (C, r) sum_x P_a(x) t(x)
            grad_logw = w * Pt
            # P_a(x) (w_a t(x) + c_a), c_a = -w_a Pt_a - g_a, then + g_a at x = y; expert by expert,
            # which keeps the (C, V) factor in cache where one broadcast (C, r, V) one did not
            c = -grad_logw - gL  # (C, r)
            for a in range(r):
                buf[:, a].mul_(torch.addcmul(c[:, a, None], w[:, a, None], t))
            buf.scatter_add_(-1, y[:, None, None].expand(C, r, 1), gL[..., None])
            G = buf.reshape(C * r, -1)  # (C r, V)
            grad_h = (G.to(mm) @ Um).view(C, r, D).to(h.dtype) if ctx.needs_input_grad[0] else None
            grad_U = None
            if ctx.needs_input_grad[1]:
                grad_U = torch.zeros(U.shape, device=U.device, dtype=torch.float32)
                grad_U[f:] = (G[:, f:].T.to(mm) @ h.reshape(C * r, D).to(mm)).float()
                grad_U = grad_U.to(U.dtype)
        return grad_h, grad_U, grad_logw, None, None, None, None, None


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
        plogp = (logp.exp() * logp).sum(-1)  # (B, T) the base distribution's own part of the KL
    Um = U.detach().to(torch.bfloat16 if cfg.bf16_unembed else torch.float32)  # (V, D), once for all chunks
    positions = torch.arange(T, device=z.device)
    zz = z.reshape(N, D)
    kls, ces, factors = [], [], []
    for s in range(n):
        # position t's base distribution for offset s is the base model's at t + s: inside the window
        # for t < T - s only; the rows past it still give the CP objective its factors
        shifted = (positions + s).clamp(max=T - 1)
        lp_s, plogp_s = logp[:, shifted].reshape(N, -1), plogp[:, shifted].reshape(N)  # (N, V), (N,)
        valid = (positions < T - s).to(torch.float32).expand(B, T).reshape(N)  # (N,)
        u = states[s].reshape(N, D)
        y = targets[:, :, s].reshape(N)  # (N,)
        kl = ce = z.new_zeros((), dtype=torch.float32)
        cols = []
        for i in range(0, N, chunk):
            sl = slice(i, i + chunk)
            logw = heads.router_logits(zz[sl]).float().log_softmax(-1)  # (C, r)
            h = heads.expert_vectors(u[sl], s)  # (C, r, D)
            f_c, model_kl = _OffsetTerms.apply(h, U, logw, y[sl], lp_s[sl], Um, kl_cols, frozen_rows)
            kl = kl + ((plogp_s[sl] + model_kl) * valid[sl]).sum()
            ce = ce - (torch.logsumexp(logw + f_c, dim=-1) * valid[sl]).sum()  # -log q(y)
            cols.append(f_c)
        count = B * (T - s)
        kls.append(kl / count)
        ces.append(ce / count)
        factors.append(torch.cat(cols))  # (N, r)
    kl, ce = torch.stack(kls), torch.stack(ces)  # (n,), (n,)
    beta = cfg.distill_beta
    loss = (offset_weights(n, cfg.distill_gamma, z.device) * (beta * kl + (1 - beta) * ce)).sum()
    return DistillTerms(loss=loss, kl=kl, ce=ce, factors=torch.stack(factors, dim=1))  # (N, n, r)
