"""The objective measured on held-out windows: losses, bits per byte and router statistics.

Evaluation uses every position (``position_fraction`` is forced to 1), so it draws nothing from any
random generator: the same model and windows give the same numbers, and the caller's RNG state is
left as it was.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from mtp_lightning.data.packing import split_window
from mtp_lightning.objectives.cp_loss import cp_objective, mixture_health


def bits_per_byte(nats: float, n_bytes: float) -> float:
    """Summed next-token NLL in nats over the UTF-8 bytes those tokens spell, in bits per byte.

    Worked example: two tokens of 1 and 3 bytes predicted with probabilities 1/2 and 1/4 cost
    ln 2 + ln 4 = 3 ln 2 nats = 3 bits over 4 bytes: 0.75 bits per byte. Perplexity is exp of the
    per-token NLL, so ``bits_per_byte = ln(ppl) * tokens / bytes / ln 2``.
    """
    return nats / math.log(2) / max(n_bytes, 1.0)


def heldout_metrics(model, dm, max_batches: int) -> dict:
    """Losses, bits per byte and router statistics of ``model`` on the first ``max_batches`` of
    ``dm``'s validation windows."""
    loss_cfg = dataclasses.replace(model.cfg.loss, position_fraction=1.0)
    token_bytes = dm.tokenizer.token_bytes().float()  # (V,)
    n_pos, joint, offsets, nats, nbytes, log_w, post = 0, 0.0, None, 0.0, 0.0, [], []
    with torch.inference_mode():
        for _, window in zip(range(max_batches), dm.val_dataloader()):
            inputs, targets = split_window(window, model.n_future)  # (B, T), (B, T, n)
            z, states = model(inputs)
            # a draft vocabulary's NLLs are over its coarser classes (model/draft_vocab.py): so are these
            t = cp_objective(model.heads, z, states, model.head_unembedding(other=True),
                             model.head_targets(targets), loss_cfg)
            n = t.token_nll.numel()
            n_pos += n
            joint += float(t.joint_nll) * n
            offsets = t.offset_nll * n if offsets is None else offsets + t.offset_nll * n  # (n_future,)
            nats += float(t.token_nll.sum())
            nbytes += float(token_bytes[targets[..., 0]].sum())
            log_w.append(t.log_w)
            post.append(t.posterior)
    health = mixture_health(torch.cat(log_w), torch.cat(post))
    weight = health["expert_weight"]  # (r,)
    offsets = (offsets / n_pos).tolist()
    return {
        "joint_nll_per_token": joint / n_pos / model.n_future, "next_token_nll": offsets[0],
        "offset_nll": offsets, "bits_per_byte": bits_per_byte(nats, nbytes),
        "router_entropy": float(health["router_entropy"]), "busiest_share": float(health["busiest_share"]),
        "dead_experts": int(health["dead_experts"]), "expert_weight": weight.tolist(),
        "expert_wins": health["expert_wins"].tolist(),
        # exp of the entropy of the mean router weights: how many experts the router really uses
        "effective_experts": float(torch.exp(-(weight * weight.clamp_min(1e-12).log()).sum())),
        "heldout_positions": n_pos,
        "heldout_bytes": int(nbytes),
    }
