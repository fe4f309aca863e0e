"""Pure helpers for drawing tokens: warping, sampling with a generator, the speculative residual.

Everything works on log-probabilities over the last dimension (..., V), so the same helper serves one
position, a batch of rows, or every draft position of a step at once. Removed tokens hold -inf.

Autoregressive sampling and speculative sampling call the same ``warp_logprobs`` on the verifier (and,
for speculative decoding, on the draft), which is what keeps the two output distributions identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How the verifier's distribution is turned into tokens. ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    """Keep the k most likely tokens (0: all). Tokens tied with the k-th are kept too."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose mass reaches top_p (1: all)."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 keeps every token)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def warps(self) -> bool:
        return self.temperature != 1.0 or self.top_k > 0 or self.top_p < 1.0


GREEDY = Sampling()


def warp_logprobs(logp: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Temperature, then top-k, then top-p; returns normalised log-probs (..., V)."""
    if s.greedy or not s.warps:
        return logp
    if s.temperature != 1.0:
        logp = logp / s.temperature
    V = logp.shape[-1]
    if 0 < s.top_k < V:
        kth = logp.topk(s.top_k, dim=-1).values[..., -1:]  # (..., 1)
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_lp, order = logp.sort(dim=-1, descending=True)  # (..., V)
        probs = sorted_lp.softmax(-1)
        # drop a token once the mass before it already reaches top_p; the first token is always kept
        drop = (probs.cumsum(-1) - probs) >= s.top_p
        logp = logp.scatter(-1, order, sorted_lp.masked_fill(drop, float("-inf")))
    return logp.log_softmax(-1)


def sample(logp: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from log-probs (..., V) -> ids (...,).

    Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i, for any
    leading shape and with one kernel. E is floored so that log E stays finite (a zero draw has
    probability ~2^-24 and would turn a -inf entry into NaN).
    """
    e = torch.empty_like(logp).exponential_(generator=generator).clamp_min_(1e-30)
    return (logp - e.log()).argmax(-1)


def acceptance_prob(p_d: torch.Tensor, q_d: torch.Tensor) -> torch.Tensor:
    """min(1, p(d) / q(d)): the chance that a draft d drawn from q is kept (Leviathan et al. 2023)."""
    return (p_d / q_d).clamp(max=1.0)


def residual_logprobs(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """log normalise(max(0, p - q)) (..., V): where to sample after a rejection.

    With q = 0 (logq = -inf) this is p itself, which is how a row whose drafts were all accepted gets
    its bonus token from the same call. When p == q nothing is left; such a row cannot have been
    rejected in exact arithmetic, so it falls back to p.
    """
    r = (logp.exp() - logq.exp()).clamp_min(0.0)  # (..., V)
    total = r.sum(-1, keepdim=True)  # (..., 1)
    return torch.where(total > 0, (r / total).log(), logp)
