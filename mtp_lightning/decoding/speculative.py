"""Self-speculative decoding with rank-r CP heads, batch >= 1, greedy or sampled (docs/method.md,
"Self-speculative decoding").

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
no truncation. An ``eos_id`` among the kept tokens ends the row, exactly where AR decoding stops. When
the eos is an accepted draft, the step counts as the budget's last step does: the drafts before the
eos are accepted and drafted, the eos itself is the step's final token, so tau counts only emitted
tokens (m + 1 per step).

Rows accept different lengths: the cache keeps one length per row. A finished row is still fed (its
tokens masked as padding) and cropped back to empty after every pass, so it costs a little compute
and never touches other rows.

The model needs: ``n_future``, ``max_seq_len``, ``new_cache``, ``extend``, ``router_logw``,
``factor_logprobs`` and ``verifier_and_factors`` (see ``CPModel``), and the cache ``lengths``/``crop``.
With the ``marginal`` verifier the offset-1 factors of the accepted position come from the
verification pass, so a draft computes offsets 2..k+1 only.

``draft_precision`` (``auto``: ``int8`` on the CPU, ``full`` elsewhere): the draft's factor maps and
unembedding product may run over int8 weight copies (``fastpath.project_int8``), which read a quarter of
the bytes. Only the proposal changes: every emitted token is still decided by the full-precision
verifier, so greedy output is the same token for token and sampling keeps the verifier's distribution
(the min(1, p/q) rule uses the q that was sampled from).

A draft vocabulary (``model.heads.draft_vocab``, ``model/draft_vocab.py``): the heads' factors cover V'
ids; drafts are mapped back to token ids, and the sampled draft distribution is scattered into the
full vocabulary with q = 0 elsewhere, so the acceptance rule and the residual stay exact. The verifier
must then be ``lm_head``.

Shape legend: B batch, k draft length, r experts, D width, V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from mtp_lightning.config import TreeConfig
from mtp_lightning.decoding.autoregressive import Generation, prefill, prepare_prompts, sync
from mtp_lightning.decoding.sampling import (GREEDY, Sampling, acceptance_prob, residual_logprobs, sample,
                                             warp_logprobs)
from mtp_lightning.model import fastpath, native

DRAFT_PRECISIONS = ("auto", "full", "int8")


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


def resolve_draft_precision(precision: str, device: torch.device | str) -> bool:
    """``draft_precision`` -> whether drafts go through int8 weight copies.

    ``auto``: int8 where it is available (the CPU, with the native kernel or fbgemm's), full precision
    elsewhere;
    ``full``: never; ``int8``: always, refused where it is not available. Only the draft changes: the
    verifier stays in full precision, so greedy output is the same token for token and sampled output
    keeps the verifier's distribution (``fastpath`` explains why)."""
    if precision not in DRAFT_PRECISIONS:
        raise ValueError(f"draft_precision={precision!r} is not one of {', '.join(DRAFT_PRECISIONS)}")
    available = torch.device(device).type == "cpu" and fastpath.int8_available()
    if precision == "int8" and not available:
        raise ValueError(f"draft_precision=int8 needs the CPU with an int8 kernel, this project's or fbgemm's "
                         f"(device {torch.device(device).type}, native kernel: {native.why_not() or 'ok'}, "
                         f"quantized engine {torch.backends.quantized.engine!r}); use auto or full")
    return precision == "int8" or (precision == "auto" and available)


def draft(model, zt: torch.Tensor, st: list[torch.Tensor], lp1: torch.Tensor | None, c: torch.Tensor, ks: int,
          sampling: Sampling, generator: torch.Generator | None, int8: bool = False, k: int | None = None
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ks draft tokens (B, ks) after c (B,), and their (warped) draft log-probs (B, ks, V) when sampling.

    ``lp1`` (B, r, V) are the offset-1 factors at this position when the verifier already built them
    (the ``marginal`` verifier), as ``verifier_and_factors`` gives them: log-probs when sampling, and
    when greedy the router-weighted probabilities w_a P_a^(1), whose column c is the expert posterior
    after c. Then only offsets 2..ks+1 are computed here. ``int8``: the factors computed here come from
    int8 weight copies (``resolve_draft_precision``). ``k`` >= ks: the generation's draft length; its
    factors are computed and the first ks used."""
    B = c.shape[0]
    k = ks if k is None else k
    if ks == 0:
        return c.new_empty(B, 0), None
    if sampling.greedy:
        return _greedy_draft(model, zt, st, lp1, c, ks, k, int8), None
    # factors for all k draft offsets even in a last, shorter step: one weight copy per generation
    if lp1 is None:
        lf = model.factor_logprobs(st, range(k + 1), int8=int8)  # (B, k+1, r, V): offsets 1..k+1
        lp1, lf = lf[:, 0], lf[:, 1:ks + 1]
    else:
        lf = model.factor_logprobs(st, range(1, k + 1), int8=int8)[:, :ks]  # (B, ks, r, V): offsets 2..ks+1
    r = lf.shape[-2]

    def pick(lp_s: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:  # (B, r, V), (B,) -> (B, r) log-probs
        return lp_s.gather(-1, tok.view(B, 1, 1).expand(B, r, 1)).squeeze(-1)

    col, inside = _columns(model, c)
    first = pick(lp1, col)  # (B, r) log P_a^(1)(c)
    if inside is not None:  # c outside the draft vocabulary: the prior router weights (draft_vocab.py)
        first = first.masked_fill(~inside[:, None], 0.0)
    logpi = model.router_logw(zt) + first  # (B, r), unnormalised posterior after c
    # the mixture is summed in probability space: a (1, r) @ (r, V) product per draft, instead of a
    # logsumexp over experts per draft
    probs = lf.exp() if r > 1 else None  # (B, ks, r, V)
    tokens, logqs = [], []
    for s in range(1, ks + 1):
        if r == 1:  # one expert: no posterior, q_s is the factor itself
            logq = lf[:, s - 1, 0]  # (B, V)
        else:
            logq = (logpi.softmax(-1)[:, None, :] @ probs[:, s - 1]).squeeze(1).log()  # (B, V)
        logq = warp_logprobs(logq, sampling)
        d = sample(logq, generator)
        logqs.append(logq)
        tokens.append(d)
        if r > 1 and s < ks:
            logpi = logpi + pick(lf[:, s - 1], d)
    drafts, logq = torch.stack(tokens, 1), torch.stack(logqs, 1)  # (B, ks), (B, ks, V)
    if getattr(model, "draft_vocab", 0):
        # columns of the draft vocabulary -> token ids; q is zero (-inf) at every other id, so the
        # verifier's min(1, p/q) and max(0, p - q) see the distribution the drafts were drawn from
        ids = model.heads.draft_ids
        full = logq.new_full((B, ks, model.unembedding.shape[0]), float("-inf"))  # (B, ks, V)
        return ids[drafts], full.scatter_(-1, ids.expand(B, ks, -1), logq)
    return drafts, logq


def _greedy_draft(model, zt: torch.Tensor, st: list[torch.Tensor], joint1: torch.Tensor | None, c: torch.Tensor,
                  ks: int, k: int, int8: bool) -> torch.Tensor:
    """Greedy drafts (B, ks): the expert posterior after c, pi_a ∝ w_a P_a^(1)(c), then the chain
    d_s = argmax_x sum_a pi_a P_a^(s)(x), pi ← pi P^(s)(d_s) (``native.reference_chain``).

    With the native kernel and int8 drafts, the whole draft is one call (``CPModel.fused_greedy_draft``:
    maps, unembedding and chain). Otherwise, with the kernel, the draft logits go to it unnormalised:
    softmax, mixture and argmax in one call instead of a softmax and a dozen small ops per draft.
    Without it, probabilities and torch ops.
    ``joint1``: the verifier's router-weighted offset-1 factors w_a P_a^(1) (B, r, V), or None (the
    ``lm_head`` verifier), when the draft computes offset 1 and the router itself. Factors for all k
    offsets even in a last, shorter step (``ks`` < k): one weight copy per generation."""
    B = c.shape[0]
    r = model.rank
    if joint1 is not None and int8 and hasattr(model, "fused_greedy_draft"):
        tokens = model.fused_greedy_draft(st[1], joint1, c, k, ks)  # None where the fused call does not apply
        if tokens is not None:
            return tokens
    width = getattr(model, "draft_vocab", 0) or model.unembedding.shape[0]  # V, or V' (draft vocabulary)
    native_chain = c.device.type == "cpu" and native.chain_supports((ks, r, width))  # a CPU kernel
    w = None
    if joint1 is None:
        lf = model.factor_logprobs(st, range(k + 1), probs=not native_chain, int8=int8, raw=native_chain)  # (B, k+1, r, V): offsets 1..k+1
        f1 = lf[:, 0].softmax(-1) if native_chain else lf[:, 0]
        w = model.router_logw(zt).exp()  # (B, r)
        joint1, lf = f1 * w[..., None], lf[:, 1:ks + 1]
    else:
        lf = model.factor_logprobs(st, range(1, k + 1), probs=not native_chain, int8=int8, raw=native_chain)[:, :ks]  # (B, ks, r, V)
    col, inside = _columns(model, c)
    pi = joint1.gather(-1, col.view(B, 1, 1).expand(B, r, 1)).view(B, r)  # (B, r)
    if inside is not None:  # c outside the draft vocabulary: the prior router weights (draft_vocab.py)
        pi = torch.where(inside[:, None], pi, w)
    # a probability that underflowed to 0 for every expert (possible only when the lm_head verifier's
    # token is far from all heads) must not zero the posterior
    pi = pi.clamp_min(torch.finfo(joint1.dtype).tiny)
    drafts = native.greedy_chain(lf, pi) if native_chain else native.reference_chain(lf, pi)  # (B, ks)
    return model.draft_tokens(drafts) if getattr(model, "draft_vocab", 0) else drafts


def _columns(model, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids c (B,) -> their columns in the heads' vocabulary (B,), and which of them are inside it
    (B,) bool; None when the heads cover the full vocabulary (every id is its own column). An id outside
    a draft vocabulary gets column 0, to be masked by the caller."""
    if not getattr(model, "draft_vocab", 0):
        return c, None
    col = model.head_targets(c)  # (B,) V' for ids outside
    inside = col < model.draft_vocab
    return col.masked_fill(~inside, 0), inside


def verify(logp: torch.Tensor, drafts: torch.Tensor, logq: torch.Tensor, allow: torch.Tensor | None,
           sampling: Sampling, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled verification (greedy is ``_greedy_accept``): verifier log-probs at the k+1 fed positions
    (B, k+1, V) and the drafts' log-probs (B, k, V) -> accepted count m (B,) and the verifier's own
    token c (B,). ``allow`` (B, k) masks drafts a row may not keep."""
    B, ks = drafts.shape
    rows = torch.arange(B, device=drafts.device)
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
    # past the last draft a row may keep, q is zero and the residual is p itself: the bonus draw
    if allow is not None:
        logq = logq.masked_fill(~allow[..., None], float("-inf"))
    logq = torch.cat([logq, torch.full_like(logq[:, :1], float("-inf"))], 1)  # (B, ks+1, V)
    return m, sample(residual_logprobs(logp[rows, m], logq[rows, m]), generator)


def _greedy_accept(drafts: list[int], target: list[int], allowed: int) -> tuple[int, int]:
    """One row's greedy verdict: the accepted drafts m (the leading drafts equal to the verifier's
    argmax, at most ``allowed``) and the verifier's own token after them."""
    m = 0
    while m < allowed and drafts[m] == target[m]:
        m += 1
    return m, target[m]


def _at(z: torch.Tensor, states: list[torch.Tensor], rows: torch.Tensor | slice, m: torch.Tensor | int, count: int
        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """z and the first ``count`` head states (B, T, D) at position m[b] of each row -> (B, D) (rows a
    full slice and m an int: the same position in every row, a view).
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
                         draft_precision: str = "auto",
                         generator: torch.Generator | None = None, eos_id: int | None = None,
                         on_step: Callable[[list[list[int]]], None] | None = None,
                         sync_done: Callable[[bool], bool] | None = None,
                         tree: TreeConfig | None = None) -> SpecGeneration:
    """Decode up to ``max_new_tokens`` per row, drafting ``draft_len`` tokens per verification pass.

    ``on_step(new_tokens)`` gets the new ids per row ([] for finished rows) after the prefill and after
    every step, so a caller can stream text; together they are exactly the returned tokens.
    ``sync_done(local_done) -> all_done`` makes ranks agree on when to stop: with it every step drafts
    the full draft_len, so every rank runs the same passes with the same shapes until all are done.
    ``draft_precision``: ``auto``, ``full`` or ``int8`` (``resolve_draft_precision``).
    ``tree`` with ``enabled``: verify a tree of candidates per step instead (``tree.generate_tree``).
    """
    if tree is not None and tree.enabled:
        from mtp_lightning.decoding.tree import generate_tree

        return generate_tree(model, prompts, max_new_tokens, tree, pad_mask=pad_mask, verifier=verifier,
                             draft_len=draft_len, sampling=sampling, draft_precision=draft_precision,
                             generator=generator, eos_id=eos_id, on_step=on_step, sync_done=sync_done)
    k = resolve_draft_len(model, draft_len)
    B = prompts.shape[0] if isinstance(prompts, torch.Tensor) else len(prompts)
    # rows near their end feed (masked) drafts they cannot keep, which needs k spare slots
    fixed_width = sync_done is not None
    extra = k if (B > 1 or fixed_width) else 0
    idx, pad_mask, slots = prepare_prompts(model, prompts, pad_mask, max_new_tokens, verifier, extra)
    device = idx.device
    int8 = resolve_draft_precision(draft_precision, device)
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
            drafts, logq = draft(model, zt, st, lp1, c, ks, sampling, generator, int8, k)  # (B, ks)
            fed = torch.cat([c[:, None], drafts], 1)  # (B, ks+1)
            z, states = model.extend(fed, cache, feed_mask)  # (B, ks+1, D)
            logp, lp1 = model.verifier_and_factors(z, states, verifier, probs=sampling.greedy)  # (B, ks+1, V), (B, ks+1, r, V)
            if sampling.greedy:
                # greedy acceptance on the host: one sync brings the drafts and the verifier's
                # argmaxes, and a few list comparisons replace a chain of tiny tensor ops
                host = torch.cat([drafts, logp.argmax(-1)], 1).tolist()  # (B, 2 ks + 1): one sync
                ms, cs = zip(*(_greedy_accept(row[:ks], row[ks:], kb) for row, kb in zip(host, k_row)))
            else:
                m, c = verify(logp, drafts, logq, allow, sampling, generator)  # (B,), (B,)
                host = torch.cat([drafts, m[:, None], c[:, None]], 1).tolist()  # (B, ks+2): one sync
                ms, cs = [row[ks] for row in host], [row[ks + 1] for row in host]
            # keep c's slot and the m accepted drafts' slots; the verifier token c is fed next step
            # one row: plain slices at an int position, no index tensors
            at, m = (slice(None), ms[0]) if B == 1 else (rows, torch.tensor(ms, device=device))
            kept = cache.lengths - (ks - m)  # (B,)
            cache.crop(kept if everyone else torch.where(alive_t, kept, 0))
            zt, st = _at(z, states, at, m, k + 1)
            lp1 = None if lp1 is None else lp1[at, m]  # (B, r, V)
            c = torch.tensor(cs, device=device)  # (B,)
            steps += 1
            new: list[list[int]] = [[] for _ in range(B)]
            finished = False
            for b in range(B):
                if not alive[b]:
                    continue
                mb, kb = ms[b], k_row[b]
                out = host[b][:mb] + [cs[b]]
                if eos_id is not None and eos_id in out:
                    # cut at the eos, as AR decoding stops there; an eos among the drafts ends the step
                    # as a row's budget does: the drafts before it were all it could keep
                    out = out[: out.index(eos_id) + 1]
                    if len(out) <= mb:
                        mb = kb = len(out) - 1
                    alive[b] = False
                accepted[b].append(mb)
                drafted[b].append(kb)
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
