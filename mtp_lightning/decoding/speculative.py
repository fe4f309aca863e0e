"""Self-speculative decoding with rank-r CP heads (METHOD.md §3), batch >= 1, greedy or sampled.

One step, for every row at once, starting from the last emitted token c and the trunk state at the
position before it:
1. draft k tokens from the heads at that one position, conditioned on c: the expert posterior
   pi_a ∝ w_a P_a^(1)(c), then q_s = sum_a pi_a P_a^(s) and pi_a ← pi_a P_a^(s)(d_s) for s = 2..k+1
   (one ``factor_logprobs`` call: offsets 1..k+1, all r experts, one position);
2. one ``extend`` over [c, d_2, .., d_{k+1}]: the verifier at those k+1 positions judges the drafts;
3. keep the longest accepted prefix (greedy: equal to the verifier's argmax; sampled: the
   min(1, p/q) rule), then take the verifier's own token from the same pass: its argmax, the residual
   normalise(max(0, p - q)) after a rejection, or a bonus draw from p when every draft was kept;
4. crop each row's cache to what it kept; the next step starts from the state at the last kept
   position, taken from this pass (no extra forward).

Bookkeeping follows vLLM: the prefill's token is not part of any step, and a step emits its m
accepted drafts plus the verifier's token of the same pass (m + 1 tokens). That is the brief's
"c plus m drafts" shifted by one token: the same count per step, and no pass is ever spent on a token
that would be thrown away. Near ``max_new_tokens`` a row may keep only ``R - 1`` drafts (R tokens
left), so it never overshoots: its step counts ``min(k, R - 1)`` drafted tokens and the output needs
no truncation. An ``eos_id`` among the kept tokens ends the row; the step then counts only the
accepted drafts up to the eos.

Rows accept different lengths: the cache keeps one length per row. A finished row is still fed (its
tokens masked as padding) and cropped back to empty after every pass, so it costs a little compute
and never touches other rows.

The model needs: ``n_future``, ``max_seq_len``, ``new_cache``, ``extend``, ``router_logw``,
``factor_logprobs`` and ``verifier_and_factors`` (see ``CPModel``), and the cache ``lengths``/``crop``.
With the ``marginal`` verifier the offset-1 factors of the accepted position come from the
verification pass, so a draft computes offsets 2..k+1 only.

Shape legend: B batch, k draft length, r experts, D width, V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from mtp_lightning.decoding.autoregressive import Generation, prefill, prepare_prompts, sync
from mtp_lightning.decoding.sampling import (GREEDY, Sampling, acceptance_prob, residual_logprobs, sample,
                                             warp_logprobs)
from mtp_lightning.model import fastpath


@dataclass
class SpecGeneration(Generation):
    accepted: list[list[int]]
    """Per row, the accepted drafts m of each of its steps (its tokens per step are m + 1)."""
    drafted: list[list[int]]
    """Per row, the drafts each step could keep: draft_len, fewer in a row's last step."""

    def step_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every (row, step) pair flattened: accepted (N,) and drafted (N,), for the metrics."""
        acc = [m for row in self.accepted for m in row]
        dra = [d for row in self.drafted for d in row]
        return torch.tensor(acc, dtype=torch.long), torch.tensor(dra, dtype=torch.long)


def resolve_draft_len(model, draft_len: int) -> int:
    """0 means the most the heads give, n_future - 1."""
    k = draft_len or model.n_future - 1
    if not 1 <= k <= model.n_future - 1:
        raise ValueError(f"draft_len={draft_len} must be between 1 and n_future - 1 = {model.n_future - 1} "
                         f"(0 picks n_future - 1); a model with n_future=1 cannot draft")
    return k


def draft(model, zt: torch.Tensor, st: list[torch.Tensor], lp1: torch.Tensor | None, c: torch.Tensor, ks: int,
          sampling: Sampling, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ks draft tokens (B, ks) after c (B,), and their (warped) draft log-probs (B, ks, V) when sampling.

    ``lp1`` (B, r, V) are the offset-1 factors at this position when the verifier already built them
    (the ``marginal`` verifier): probabilities when greedy, log-probs when sampling, as
    ``verifier_and_factors`` gives them. Then only offsets 2..ks+1 are computed here."""
    B = c.shape[0]
    if ks == 0:
        return c.new_empty(B, 0), None
    greedy = sampling.greedy
    # greedy drafting needs only argmaxes: the factors stay probabilities (one softmax); sampling
    # warps log-probs
    if lp1 is None:
        lf = model.factor_logprobs(st, range(ks + 1), probs=greedy)  # (B, ks+1, r, V): offsets 1..ks+1
        lp1, lf = lf[:, 0], lf[:, 1:]
    else:
        lf = model.factor_logprobs(st, range(1, ks + 1), probs=greedy)  # (B, ks, r, V): offsets 2..ks+1
    r = lf.shape[-2]

    def pick(lp_s: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:  # (B, r, V), (B,) -> (B, r) log-probs
        got = lp_s.gather(-1, tok.view(B, 1, 1).expand(B, r, 1)).squeeze(-1)
        # greedy: a probability that underflowed to 0 for every expert (possible only when the
        # lm_head verifier's token is far from all heads) must not turn the posterior into NaN
        return got.clamp_min(torch.finfo(got.dtype).tiny).log() if greedy else got

    logpi = model.router_logw(zt) + pick(lp1, c)  # (B, r), unnormalised posterior after c
    # the mixture is summed in probability space: a (1, r) @ (r, V) product per draft, instead of a
    # logsumexp over experts per draft
    probs = lf if greedy else (lf.exp() if r > 1 else None)  # (B, ks, r, V)
    tokens, logqs = [], []
    for s in range(1, ks + 1):
        if r == 1:  # one expert: no posterior, q_s is the factor itself
            logq = lf[:, s - 1, 0]  # (B, V)
        else:
            q = (logpi.softmax(-1)[:, None, :] @ probs[:, s - 1]).squeeze(1)  # (B, V)
            logq = q if greedy else q.log()  # greedy only needs the argmax
        if greedy:
            d = logq.argmax(-1)  # (B,)
        else:
            logq = warp_logprobs(logq, sampling)
            d = sample(logq, generator)
            logqs.append(logq)
        tokens.append(d)
        if r > 1 and s < ks:
            logpi = logpi + pick(lf[:, s - 1], d)
    return torch.stack(tokens, 1), (torch.stack(logqs, 1) if logqs else None)  # (B, ks), (B, ks, V)


def verify(logp: torch.Tensor, drafts: torch.Tensor, logq: torch.Tensor | None, allow: torch.Tensor | None,
           sampling: Sampling, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Verifier log-probs at the k+1 fed positions (B, k+1, V) -> accepted count m (B,) and the
    verifier's own token c (B,). ``allow`` (B, k) masks drafts a row may not keep."""
    B, ks = drafts.shape
    rows = torch.arange(B, device=drafts.device)
    if sampling.greedy:
        target = logp.argmax(-1)  # (B, ks+1)
        ok = drafts == target[:, :-1]  # (B, ks)
    else:
        logp = warp_logprobs(logp, sampling)
        if ks == 0:
            return torch.zeros(B, dtype=torch.long, device=drafts.device), sample(logp[:, 0], generator)
        p_d = logp[:, :-1].gather(-1, drafts[..., None]).squeeze(-1).exp()  # (B, ks)
        q_d = logq.gather(-1, drafts[..., None]).squeeze(-1).exp()  # (B, ks)
        u = torch.rand(B, ks, generator=generator, device=drafts.device)
        ok = u < acceptance_prob(p_d, q_d)  # (B, ks)
    if allow is not None:
        ok = ok & allow
    m = ok.long().cumprod(1).sum(1)  # (B,) leading accepted drafts
    if sampling.greedy:
        return m, target[rows, m]
    # past the last draft a row may keep, q is zero and the residual is p itself: the bonus draw
    if allow is not None:
        logq = logq.masked_fill(~allow[..., None], float("-inf"))
    logq = torch.cat([logq, torch.full_like(logq[:, :1], float("-inf"))], 1)  # (B, ks+1, V)
    return m, sample(residual_logprobs(logp[rows, m], logq[rows, m]), generator)


def _at(z: torch.Tensor, states: list[torch.Tensor], rows: torch.Tensor, m: torch.Tensor, count: int
        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """z and the first ``count`` head states (B, T, D) at position m[b] of each row -> (B, D).
    Linear/MLP heads share one state tensor (the trunk's z), so each distinct tensor is gathered once."""
    seen = {id(z): z[rows, m]}
    st = []
    for s in states[:count]:
        if id(s) not in seen:
            seen[id(s)] = s[rows, m]
        st.append(seen[id(s)])
    return seen[id(z)], st


def generate_speculative(model, prompts, max_new_tokens: int, *, pad_mask: torch.Tensor | None = None,
                         verifier: str = "marginal", draft_len: int = 0, sampling: Sampling = GREEDY,
                         generator: torch.Generator | None = None, eos_id: int | None = None,
                         on_step: Callable[[list[list[int]]], None] | None = None,
                         sync_done: Callable[[bool], bool] | None = None) -> SpecGeneration:
    """Decode up to ``max_new_tokens`` per row, drafting ``draft_len`` tokens per verification pass.

    ``on_step(new_tokens)`` gets the new ids per row ([] for finished rows) after the prefill and after
    every step, so a caller can stream text; together they are exactly the returned tokens.
    ``sync_done(local_done) -> all_done`` makes ranks agree on when to stop: with it every step drafts
    the full draft_len, so every rank runs the same passes with the same shapes until all are done.
    """
    k = resolve_draft_len(model, draft_len)
    B = prompts.shape[0] if isinstance(prompts, torch.Tensor) else len(prompts)
    # rows near their end feed (masked) drafts they cannot keep, which needs k spare slots
    fixed_width = sync_done is not None
    extra = k if (B > 1 or fixed_width) else 0
    idx, pad_mask, slots = prepare_prompts(model, prompts, pad_mask, max_new_tokens, verifier, extra)
    device = idx.device
    rows = torch.arange(B, device=device)
    with torch.inference_mode(), fastpath.decoding():
        sync(device)
        t0 = time.perf_counter()
        cache, zt, st, lp1, c = prefill(model, idx, pad_mask, slots, verifier, sampling, generator)  # c (B,)
        first = c.tolist()
        sync(device)
        t_prefill = time.perf_counter() - t0

        tokens = [[x] for x in first]
        if on_step is not None:
            on_step([[x] for x in first])
        alive = [max_new_tokens > 1 and x != eos_id for x in first]
        alive_t = torch.tensor(alive, device=device)  # (B,) refreshed only when a row finishes
        accepted: list[list[int]] = [[] for _ in range(B)]
        drafted: list[list[int]] = [[] for _ in range(B)]
        steps = 0
        while True:
            local_done = not any(alive)
            if (sync_done(local_done) if fixed_width else local_done):
                break
            k_row = [min(k, max_new_tokens - len(t) - 1) if a else 0 for t, a in zip(tokens, alive)]
            ks = k if fixed_width else max(k_row)
            everyone = all(alive)
            if everyone and min(k_row) == ks:
                allow = feed_mask = None  # the common case: every row keeps up to ks drafts
            else:
                kr = torch.tensor(k_row, device=device)[:, None]  # (B, 1)
                pos = torch.arange(ks + 1, device=device)[None]  # (1, ks+1)
                allow = pos[:, :-1] < kr  # (B, ks)
                feed_mask = (pos <= kr) & alive_t[:, None]  # (B, ks+1): the rest is padding
            drafts, logq = draft(model, zt, st, lp1, c, ks, sampling, generator)  # (B, ks)
            fed = torch.cat([c[:, None], drafts], 1)  # (B, ks+1)
            z, states = model.extend(fed, cache, feed_mask)  # (B, ks+1, D)
            logp, lp1 = model.verifier_and_factors(z, states, verifier, probs=sampling.greedy)  # (B, ks+1, V), (B, ks+1, r, V)
            m, c = verify(logp, drafts, logq, allow, sampling, generator)  # (B,), (B,)
            # keep c's slot and the m accepted drafts' slots; the verifier token c is fed next step
            kept = cache.lengths - ks + m  # (B,)
            cache.crop(kept if everyone else torch.where(alive_t, kept, 0))
            zt, st = _at(z, states, rows, m, k + 1)
            lp1 = None if lp1 is None else lp1[rows, m]  # (B, r, V)
            host = torch.cat([drafts, m[:, None], c[:, None]], 1).tolist()  # (B, ks+2): one sync
            steps += 1
            new: list[list[int]] = [[] for _ in range(B)]
            finished = False
            for b in range(B):
                if not alive[b]:
                    continue
                mb = host[b][ks]
                out = host[b][:mb] + [host[b][ks + 1]]
                if eos_id is not None and eos_id in out:
                    out = out[: out.index(eos_id) + 1]
                    mb = min(mb, len(out))
                    alive[b] = False
                accepted[b].append(mb)
                drafted[b].append(k_row[b])
                tokens[b].extend(out)
                new[b] = out
                assert len(tokens[b]) <= max_new_tokens
                if len(tokens[b]) == max_new_tokens:
                    alive[b] = False
                finished |= not alive[b]
            if finished:
                # a finished row's cache is no longer needed: empty it so padding passes stay in bounds
                alive_t = torch.tensor(alive, device=device)
                cache.crop(torch.where(alive_t, cache.lengths, 0))
            if on_step is not None:
                on_step(new)
        sync(device)
        seconds = time.perf_counter() - t0
    return SpecGeneration(tokens, seconds, t_prefill, steps, accepted, drafted)
