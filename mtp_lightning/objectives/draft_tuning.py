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
3. ``pool_batch``: the continuations of one optimizer step, a pure function of the step, so a resumed
   run draws the same ones.

The trunk, the router and offset 1 get no gradient, so the verifier (and every decoded output) stays
bit-identical while the drafts improve. Shape legend: S continuations, L tokens per continuation,
B batch, T positions, n offsets, r experts, D width.
"""

from __future__ import annotations

import torch

from mtp_lightning.config import LossConfig
from mtp_lightning.objectives.cp_loss import factor_logprobs
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
