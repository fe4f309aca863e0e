"""Speculative-decoding acceptance as a torchmetrics ``Metric``, with vLLM's definitions.

Per verification step (one row, one pass) the decoder reports m, the drafts accepted, and how many
drafts the step could keep (draft_len, fewer in a row's last step). The metric keeps only sums, so
``dist_reduce_fx="sum"`` merges ranks exactly:
- acceptance rate = accepted drafts / drafted tokens;
- mean acceptance length tau = tokens per step = mean(m + 1), at most draft_len + 1;
- per-position rate j = steps that accepted draft position j / steps that drafted position j
  (vLLM divides by all steps; the two differ only on rows' shortened last steps);
- histogram: steps with exactly m accepted, m = 0..draft_len (counts).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class SpecAcceptance(Metric):
    full_state_update = False
    higher_is_better = True

    def __init__(self, draft_len: int, **kwargs):
        super().__init__(**kwargs)
        if draft_len < 1:
            raise ValueError(f"draft_len={draft_len} must be >= 1")
        self.draft_len = draft_len
        long = dict(dtype=torch.long)
        self.add_state("drafted", torch.tensor(0, **long), dist_reduce_fx="sum")
        self.add_state("accepted", torch.tensor(0, **long), dist_reduce_fx="sum")
        self.add_state("steps", torch.tensor(0, **long), dist_reduce_fx="sum")
        self.add_state("emitted", torch.tensor(0, **long), dist_reduce_fx="sum")
        self.add_state("position_accepted", torch.zeros(draft_len, **long), dist_reduce_fx="sum")  # (k,)
        self.add_state("position_drafted", torch.zeros(draft_len, **long), dist_reduce_fx="sum")  # (k,)
        self.add_state("histogram", torch.zeros(draft_len + 1, **long), dist_reduce_fx="sum")  # (k+1,)

    def update(self, accepted: torch.Tensor, drafted: torch.Tensor | None = None) -> None:
        """accepted (N,) drafts kept per step; drafted (N,) drafts each step could keep (default k)."""
        k = self.draft_len
        accepted = torch.as_tensor(accepted, dtype=torch.long, device=self.steps.device).reshape(-1)  # (N,)
        drafted = (torch.full_like(accepted, k) if drafted is None else
                   torch.as_tensor(drafted, dtype=torch.long, device=accepted.device).reshape(-1))  # (N,)
        assert bool(((accepted >= 0) & (accepted <= drafted) & (drafted <= k)).all()), \
            "each step needs 0 <= accepted <= drafted <= draft_len"
        pos = torch.arange(1, k + 1, device=accepted.device)  # (k,) draft positions j
        self.drafted += drafted.sum()
        self.accepted += accepted.sum()
        self.steps += accepted.numel()
        self.emitted += (accepted + 1).sum()
        self.position_accepted += (accepted[:, None] >= pos).sum(0)  # (k,)
        self.position_drafted += (drafted[:, None] >= pos).sum(0)  # (k,)
        self.histogram += torch.bincount(accepted, minlength=k + 1)  # (k+1,)

    def compute(self) -> dict[str, torch.Tensor]:
        def ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a.double().div(b.clamp(min=1).double()).float()  # 0 where nothing was counted

        return {
            "acceptance_rate": ratio(self.accepted, self.drafted),
            "mean_acceptance_length": ratio(self.emitted, self.steps),
            "per_position": ratio(self.position_accepted, self.position_drafted),  # (k,)
            "histogram": self.histogram.clone(),  # (k+1,)
        }

    def summary(self) -> dict[str, torch.Tensor]:
        """``compute()`` with ``per_position`` always of shape (k,): torchmetrics returns a one-element
        result as a scalar, which a draft length of 1 would otherwise produce."""
        out = self.compute()
        return {**out, "per_position": out["per_position"].reshape(-1)}
