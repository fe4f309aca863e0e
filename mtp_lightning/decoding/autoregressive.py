"""KV-cached autoregressive decoding with the verifier as the next-token distribution.

This is the baseline speculative decoding must match: greedy output token for token, sampled output in
distribution. It uses the same model calls as the speculative decoder (``extend`` with a ``KVCache``,
``verifier_logprobs``), so the two differ only in how many tokens a pass verifies.

Prompts are either a list of id lists (left-padded here) or a (B, T) LongTensor with an optional
``pad_mask`` (True for real tokens). Left padding keeps every row's last prompt token in the last
column, so one slice gives each row's next-token distribution after the prefill.

Shape legend: B batch, T prompt length, D width, V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mtp_lightning.decoding.sampling import GREEDY, Sampling, sample, warp_logprobs
from mtp_lightning.model import fastpath

VERIFIERS = ("marginal", "lm_head")


@dataclass
class Generation:
    tokens: list[list[int]]
    """Generated ids per row, prompt excluded; a row stops after ``eos_id`` if one was given."""
    seconds: float
    """Wall time of the whole call, prefill included."""
    prefill_seconds: float
    steps: int
    """Forward passes after the prefill."""

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def left_pad(prompts: list[list[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Id lists -> idx (B, T) and pad_mask (B, T), real tokens right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        idx[b, T - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = True
    return idx.to(device), mask.to(device)


def prepare_prompts(model, prompts, pad_mask: torch.Tensor | None, max_new_tokens: int, verifier: str,
                    extra_slots: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Checks shared by both decoders; returns idx (B, T), pad_mask or None, and the cache size."""
    if verifier not in VERIFIERS:
        raise ValueError(f"verifier={verifier!r} is not one of {', '.join(VERIFIERS)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    device = next(model.parameters()).device
    if isinstance(prompts, torch.Tensor):
        idx = prompts.to(device)
        if idx.dim() != 2:
            raise ValueError(f"a prompt tensor must be (B, T), got shape {tuple(idx.shape)}")
        pad_mask = None if pad_mask is None else pad_mask.to(device=device, dtype=torch.bool)
    else:
        idx, pad_mask = left_pad(prompts, device=device)
    if pad_mask is not None and not bool(pad_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: the last column of pad_mask must be all True")
    if pad_mask is not None and bool(pad_mask.all()):
        pad_mask = None  # an all-real batch takes the cheaper unmasked path
    # the cache holds the (padded) prompt and every generated token but the last, which is never fed
    slots = idx.shape[1] + max_new_tokens - 1 + extra_slots
    if slots > model.max_seq_len:
        raise ValueError(f"prompt of {idx.shape[1]} tokens + max_new_tokens={max_new_tokens}"
                         f"{f' + {extra_slots} draft slots' if extra_slots else ''} needs {slots} "
                         f"positions but the model holds max_seq_len={model.max_seq_len}; shorten the "
                         f"prompt or lower max_new_tokens")
    return idx, pad_mask, slots


def sync(device: torch.device) -> None:
    """Wait for queued kernels so that wall-clock times measure the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def last_position(z: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """z (B, T, D) and n head states (B, T, D) -> the same at the last position, (B, D)."""
    return z[:, -1], [s[:, -1] for s in states]


def choose(logp: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Next token from log-probs (B, V) -> (B,): argmax, or a draw from the warped distribution.
    Greedy decoding passes probabilities (``verifier_and_factors(probs=True)``); the argmax is the same."""
    if sampling.greedy:
        return logp.argmax(-1)
    return sample(warp_logprobs(logp, sampling), generator)


def prefill(model, idx: torch.Tensor, pad_mask: torch.Tensor | None, slots: int, verifier: str,
            sampling: Sampling, generator: torch.Generator | None):
    """Both decoders' first pass: a new cache of ``slots`` filled with the prompts idx (B, T), and the
    verifier's first token. Returns the cache, z (B, D) and the head states at the last position, the
    verifier's offset-1 factors there (``marginal``; None for ``lm_head``; probabilities when greedy,
    log-probs when sampling) and the token (B,)."""
    cache = model.new_cache(idx.shape[0], slots)
    z, states = model.extend(idx, cache, pad_mask)  # (B, T, D)
    zt, st = last_position(z, states)
    logp, lp1 = model.verifier_and_factors(zt, st, verifier, probs=sampling.greedy)  # (B, V), (B, r, V) or None
    return cache, zt, st, lp1, choose(logp, sampling, generator)


def generate_ar(model, prompts, max_new_tokens: int, *, pad_mask: torch.Tensor | None = None,
                verifier: str = "marginal", sampling: Sampling = GREEDY,
                generator: torch.Generator | None = None, eos_id: int | None = None,
                inference_mode: bool = True) -> Generation:
    """Decode up to ``max_new_tokens`` per row, one verifier token per forward pass.

    ``inference_mode=False`` decodes under ``no_grad`` instead: for a model that training will use next
    under FSDP2, whose parameter gathers must not be made of inference tensors."""
    idx, pad_mask, slots = prepare_prompts(model, prompts, pad_mask, max_new_tokens, verifier)
    B, device = idx.shape[0], idx.device
    with (torch.inference_mode() if inference_mode else torch.no_grad()), fastpath.decoding():
        sync(device)
        t0 = time.perf_counter()
        cache, _, _, _, tok = prefill(model, idx, pad_mask, slots, verifier, sampling, generator)  # tok (B,)
        sync(device)
        t_prefill = time.perf_counter() - t0
        out = [tok]
        done = tok == eos_id if eos_id is not None else None  # (B,)
        steps = 0
        for _ in range(max_new_tokens - 1):
            # a finished row keeps being fed (its cache is its own), so every row runs every pass
            if done is not None and bool(done.all()):
                break
            z, states = model.extend(tok[:, None], cache)  # (B, 1, D)
            zt, st = last_position(z, states)
            scores, _ = model.verifier_and_factors(zt, st, verifier, probs=sampling.greedy)  # (B, V)
            tok = choose(scores, sampling, generator)
            out.append(tok)
            steps += 1
            if done is not None:
                done = done | (tok == eos_id)
        rows = torch.stack(out, 1).tolist()  # (B, max_new_tokens) at most
        sync(device)
        seconds = time.perf_counter() - t0
    if eos_id is not None:
        rows = [r[: r.index(eos_id) + 1] if eos_id in r else r for r in rows]
    return Generation(rows, seconds, t_prefill, steps)
