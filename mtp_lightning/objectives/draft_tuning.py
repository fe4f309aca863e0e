"""Draft tuning: self-distillation of the draft offsets on the model's own text.

Greedy self-speculative decoding accepts a draft token when it equals the verifier's own argmax
(docs/method.md, "Self-speculative decoding"), so what the draft offsets 2..n should predict is the
model's own continuation, not the corpus. Medusa-2 trains its heads on self-generated text for the
same reason. Here:

1. ``generate_pool``: the model continues prompts from the training split, with the verifier it
   decodes with, in eval mode: greedily (``draft_tuning.temperature=0``, for greedy decoding), or by
   sampling (for sampled decoding, whose drafts are kept with probability min(1, p/q): there the best
   draft distribution q is the model's own p, and maximum likelihood on samples of p fits it);
2. ``draft_objective``: the negative log-likelihood of each continuation's tokens at offsets 2..n given
   its first token, under the CP mixture with the router and the offset-1 factors held fixed:

       -log P(y_2..y_n | y_1) = -[logsumexp_a(log w_a + sum_s log P_a^(s)(y_s))
                                  - logsumexp_a(log w_a + log P_a^(1)(y_1))]

   which is exactly the draft distribution's posterior chain (pi after y_1, then q_2, q_3, ...);
   With ``draft_tuning.soft_weight`` = beta > 0 the drafts also learn the verifier's whole
   distribution, not only the token the continuation took (soft targets, ``soft_terms``): for offset s
   the draft distribution is the posterior chain's

       q_s(x) = sum_a pi_a^(s) P_a^(s)(x),   pi^(s) = softmax_a(log w_a + sum_{j<s} log P_a^(j)(y_j)),

   and its target p_s the verifier's next-token distribution at position t + s - 1 (having read the
   continuation up to y_{s-1}), so that the objective is

       (1 - beta) * sum_{s>=2} -log q_s(y_s) + beta * sum_{s>=2} KL(p_s || q_s),

   whose first part is the hard objective above (the chain rule: the sum of -log q_s(y_s) over s >= 2
   is -log P(y_2..y_n | y_1)). A sampled draft is kept with probability min(1, p/q), so its acceptance
   is 1 - TV(p_s, q_s): the KL drives q_s towards p_s at every prefix, which greedy drafting (the
   argmax of q_s against that of p_s) and sampled drafting both want, where the hard targets of greedy
   text make the drafts sharp and sampled acceptance poor.
3. ``pool_batch``: the continuations of one optimizer step, a pure function of the step, so a resumed
   run draws the same ones.

The trunk, the router and offset 1 get no gradient, so the verifier (and every decoded output) stays
bit-identical while the drafts improve. Shape legend: S continuations, L tokens per continuation,
B batch, T positions, n offsets, r experts, D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtp_lightning.config import LossConfig
from mtp_lightning.objectives.cp_loss import auto_chunk, factor_logprobs
from mtp_lightning.decoding.autoregressive import generate_ar
from mtp_lightning.decoding.sampling import GREEDY, Sampling


def generate_pool(model, prompts: torch.Tensor, new_tokens: int, verifier: str, batch_size: int = 16,
                  on_batch=None, inference_mode: bool = True, sampling: Sampling = GREEDY,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Continuations (S, P + new_tokens) of prompts (S, P), in batches: greedy, or drawn with
    ``sampling`` from ``generator``. The model's mode is restored afterwards. Fixed lengths (no
    end-of-text stop), so every rank runs the same passes."""
    was_training = model.training
    model.eval()
    rows = []
    try:
        for i in range(0, prompts.shape[0], batch_size):
            chunk = prompts[i:i + batch_size]
            g = generate_ar(model, chunk, new_tokens, verifier=verifier, inference_mode=inference_mode,
                            sampling=sampling, generator=generator)
            rows.append(torch.cat([chunk.cpu(), torch.tensor(g.tokens, dtype=torch.long)], 1))
            if on_batch is not None:
                on_batch(min(i + batch_size, prompts.shape[0]))
    finally:
        model.train(was_training)
    return torch.cat(rows)


def mixed_pool(model, prompts: torch.Tensor, new_tokens: int, verifier: str, sampled: int,
               sampling: Sampling, generator: torch.Generator | None = None, on_batch=None,
               inference_mode: bool = True) -> torch.Tensor:
    """``generate_pool`` with its first ``sampled`` prompts continued by ``sampling`` and the others
    greedily (a pool that tunes the drafts for both decoding modes). ``on_batch`` counts over all."""
    parts = []
    for start, stop, how in ((0, sampled, sampling), (sampled, prompts.shape[0], GREEDY)):
        if stop > start:
            report = None if on_batch is None else (lambda done, start=start: on_batch(start + done))
            parts.append(generate_pool(model, prompts[start:stop], new_tokens, verifier, on_batch=report,
                                       inference_mode=inference_mode, sampling=how, generator=generator))
    return torch.cat(parts)


def pool_batch(pool: torch.Tensor, step: int, seed: int, batch_size: int, rank: int = 0, world: int = 1
               ) -> torch.Tensor:
    """This rank's rows (batch_size, L) for optimizer step ``step``: a slice of one permutation of the
    pool drawn from (seed, step) alone, so ranks get disjoint rows and a resume draws the same ones."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    perm = torch.randperm(pool.shape[0], generator=g)
    take = (torch.arange(batch_size) + rank * batch_size) % pool.shape[0]
    return pool[perm[take]]


def draft_objective(heads, z: torch.Tensor, states: list[torch.Tensor], U: torch.Tensor,
                    targets: torch.Tensor, first: int, cfg: LossConfig) -> torch.Tensor:
    """Mean -log P(y_2..y_n | y_1) over positions t >= ``first`` (those whose targets are all
    generated). z (B, T, D), states n x (B, T, D), targets (B, T, n). Only offsets 2..n get gradients."""
    n = targets.shape[-1]
    z = z[:, first:].reshape(-1, z.shape[-1])  # (N, D)
    st = [u[:, first:].reshape(-1, u.shape[-1]) for u in states]
    tg = targets[:, first:].reshape(-1, n)  # (N, n)
    with torch.no_grad():
        log_w = heads.router_logits(z).float().log_softmax(-1)  # (N, r)
        first_lp = log_w + factor_logprobs(heads, st, U, tg, range(1), cfg)[:, 0]  # (N, r)
    far = factor_logprobs(heads, st, U.detach(), tg, range(1, n), cfg)  # (N, n-1, r)
    joint = torch.logsumexp(first_lp + far.sum(1), dim=-1)  # (N,)
    return -(joint - torch.logsumexp(first_lp, dim=-1)).mean()


@dataclass
class DraftTerms:
    loss: torch.Tensor  # (1 - beta) * ce.sum() + beta * kl.sum() (0-dim)
    ce: torch.Tensor  # (n - 1,) -log q_s(y_s) for s = 2..n, mean over positions
    kl: torch.Tensor  # (n - 1,) KL(p_s || q_s) for s = 2..n, mean over the positions that have p_s


def soft_terms(heads, z: torch.Tensor, states: list[torch.Tensor], U: torch.Tensor, targets: torch.Tensor,
               first: int, cfg: LossConfig, verifier_logp: torch.Tensor, soft_weight: float,
               kl_cols: int = 0) -> DraftTerms:
    """The module docstring's soft-target objective over positions t >= ``first``: z (B, T, D), states
    n x (B, T, D), targets (B, T, n) in the heads' classes, ``verifier_logp`` (B, T, K) the verifier's
    next-token log-probs at every position (no gradient). ``kl_cols`` = V' > 0 for a draft vocabulary:
    U then has the V' + 1 classes' rows and the verifier's log-probs are over the V' draft ids,
    renormalised there (as in the distillation, ``objectives/distill.py``); 0: K is the full vocabulary.

    Position t's target for offset s is the verifier's at t + s - 1, so it exists for t + s - 1 < T only;
    the CE keeps every position, the KL those. Each chunk of positions builds its offset's mixture over
    the vocabulary once, with the hand-derived gradient of ``distill._OffsetTerms`` (the posterior
    weights stand where the distillation has the router's), and gives the factor log P_a^(s)(y_s) the
    next offsets' posteriors need. Only offsets 2..n get gradients: U is used detached."""
    from mtp_lightning.objectives.distill import _OffsetTerms

    B, T, n = targets.shape
    D = z.shape[-1]
    Tk = T - first
    N = B * Tk
    zz = z[:, first:].reshape(N, D)
    st = [u[:, first:].reshape(N, D) for u in states]
    tg = targets[:, first:].reshape(N, n)
    U = U.detach()
    Um = U.to(torch.bfloat16 if cfg.bf16_unembed else torch.float32)  # (V, D), once for all chunks
    chunk = max(1, (cfg.chunk_size or auto_chunk(U.shape[0])) // heads.r)
    with torch.no_grad():
        logp = verifier_logp.detach()[:, first:].float()  # (B, Tk, K)
        plogp = (logp.exp() * logp).sum(-1)  # (B, Tk) the target's own part of the KL
        log_post = heads.router_logits(zz).float().log_softmax(-1)  # (N, r) log w
        log_post = log_post + factor_logprobs(heads, st, U, tg, range(1), cfg)[:, 0]  # + log P_a^(1)(y_1)
    positions = torch.arange(Tk, device=z.device)
    ces, kls = [], []
    for s in range(1, n):
        # 0-based s here: targets[:, t, s] is token t + s + 1, whose distribution the verifier gives at
        # position t + s, index (t - first) + s of the positions kept; the rows past the window still
        # give the CE and the next posterior their factors
        shifted = (positions + s).clamp(max=Tk - 1)
        lp_s, plogp_s = logp[:, shifted].reshape(N, -1), plogp[:, shifted].reshape(N)  # (N, K), (N,)
        valid = (positions < Tk - s).to(torch.float32).expand(B, Tk).reshape(N)  # (N,)
        log_pi = log_post.log_softmax(-1)  # (N, r) the posterior after y_1..y_s
        ce = kl = z.new_zeros((), dtype=torch.float32)
        cols = []
        for i in range(0, N, chunk):
            sl = slice(i, i + chunk)
            h = heads.expert_vectors(st[s][sl], s)  # (C, r, D)
            f_c, model_kl = _OffsetTerms.apply(h, U, log_pi[sl], tg[sl, s], lp_s[sl], Um, kl_cols, 0)
            kl = kl + ((plogp_s[sl] + model_kl) * valid[sl]).sum()
            ce = ce - torch.logsumexp(log_pi[sl] + f_c, dim=-1).sum()  # -log q_s(y_s)
            cols.append(f_c)
        log_post = log_post + torch.cat(cols)  # (N, r)
        ces.append(ce / N)
        kls.append(kl / valid.sum().clamp(min=1))
    ce, kl = torch.stack(ces), torch.stack(kls)
    return DraftTerms(loss=(1 - soft_weight) * ce.sum() + soft_weight * kl.sum(), ce=ce, kl=kl)


def verifier_targets(model, z: torch.Tensor, states: list[torch.Tensor], verifier: str,
                     rows: int = 8) -> torch.Tensor:
    """The verifier's next-token log-probs (B, T, K) at every position of a frozen-trunk forward, without
    gradients, a few rows at a time: the ``marginal`` builds (rows, T, r, V). With a draft vocabulary
    (``lm_head`` only) K = V': the logits at the draft ids, renormalised there."""
    out = []
    with torch.no_grad():
        for i in range(0, z.shape[0], rows):
            zi = z[i:i + rows]
            if model.draft_vocab:
                out.append(model.lm_logits(zi, rows=model.heads.draft_ids).float().log_softmax(-1))
            else:
                out.append(model.verifier_logprobs(zi, [u[i:i + rows] for u in states], verifier).float())
    return torch.cat(out)
