"""A cheap, teacher-forced estimate of greedy speculative acceptance, from one batch of windows.

Real speculative decoding runs a loop of small passes. This estimate needs one trunk pass over data:
at every position t the draft is conditioned on the *data* tokens y_1..y_{s-1} (x_{t+1}..) instead of
the model's own output, and draft s is compared with the verifier's argmax at position t+s-1, also
computed over the data. The accepted length is the number of leading matches for s = 2..k+1.
It tracks real acceptance when the model's greedy output resembles the data, and costs no decoding
loop, so it can run at every validation. Two differences from real decoding, both by design: c is the
data token y_1 rather than the verifier's argmax, and every position counts (no step boundaries).

A window is (B, T + n): inputs are window[:, :T]; only positions t <= T-1-k have every judge inside.

Shape legend: B batch, T positions, C positions per chunk, k draft length, r experts, V vocabulary.
"""

from __future__ import annotations

import torch

from mtp_lightning.decoding.speculative import resolve_draft_len


def teacher_forced_acceptance(model, windows: torch.Tensor, draft_len: int = 0, verifier: str = "marginal",
                              chunk_elems: int = 1 << 23) -> dict[str, torch.Tensor]:
    """windows (B, T+n) -> {"mean_acceptance_length", "acceptance_rate"} as 0-dim float tensors.

    Factor log-probs are built for ``chunk_elems`` floats at a time (about 32 MB), never for all
    positions at once, so memory stays near that of one trunk pass.
    """
    k = resolve_draft_len(model, draft_len)
    n = model.n_future
    B, W = windows.shape
    T = W - n
    if T < k + 1:
        raise ValueError(f"windows of {W} tokens leave T={T} inputs for n_future={n}; need at least "
                         f"draft_len + 1 = {k + 1}")
    draft_vocab = getattr(model, "draft_vocab", 0)
    V = draft_vocab or model.unembedding.shape[0]  # the heads' vocabulary: V, or V' (draft_vocab.py)
    r = model.rank
    with torch.inference_mode():
        windows = windows.to(model.unembedding.device)
        z, states = model(windows[:, :T])  # (B, T, D), n x (B, T, D)

        step = max(1, chunk_elems // (B * r * model.unembedding.shape[0]))  # the verifier's full vocabulary
        judge = torch.cat([model.verifier_logprobs(z[:, a:a + step], [s[:, a:a + step] for s in states],
                                                   verifier).argmax(-1)
                           for a in range(0, T, step)], 1)  # (B, T): the verifier's greedy token

        n_pos = T - k  # positions t = 0..T-1-k
        step = max(1, chunk_elems // (B * (k + 1) * r * V))
        total = torch.zeros((), dtype=torch.long, device=z.device)
        for a in range(0, n_pos, step):
            b = min(n_pos, a + step)
            lf = model.factor_logprobs([s[:, a:b] for s in states[: k + 1]], range(k + 1))  # (B, C, k+1, r, V)
            logpi = model.router_logw(z[:, a:b])  # (B, C, r)
            ok = []
            for o in range(1, k + 1):  # draft offset o+1, conditioned on the data y_1..y_o
                y = windows[:, a + o: b + o]  # (B, C) y_o = x_{t+o}
                if draft_vocab:  # its column; an id outside the draft vocabulary leaves the posterior as it is
                    y = model.head_targets(y)
                    inside = y < draft_vocab
                    y = y.masked_fill(~inside, 0)
                lp_y = lf[:, :, o - 1].gather(-1, y[:, :, None, None].expand(-1, -1, r, 1)).squeeze(-1)  # (B, C, r)
                logpi = logpi + (lp_y.masked_fill(~inside[..., None], 0.0) if draft_vocab else lp_y)
                d = torch.logsumexp(logpi[..., None] + lf[:, :, o], dim=-2).argmax(-1)  # (B, C)
                if draft_vocab:
                    d = model.draft_tokens(d)
                ok.append(d == judge[:, a + o: b + o])  # the verifier at t+o judges x_{t+o+1}
            m = torch.stack(ok, -1).long().cumprod(-1).sum(-1)  # (B, C) leading matches
            total += m.sum()
    # outside inference mode, so the results are ordinary tensors that logging may touch in place
    rate = total.float() / (B * n_pos * k)
    return {"mean_acceptance_length": 1.0 + rate * k, "acceptance_rate": rate}
