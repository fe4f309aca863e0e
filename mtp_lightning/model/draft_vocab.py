"""A draft vocabulary: the heads predict over the V' most frequent tokens only (``model.heads.draft_vocab``).

Multi-token heads cost n*r unembedding products per position, each V wide (docs/method.md, "Training objective"). A draft
only proposes tokens, and the verifier decides what is emitted, so the heads need not cover the whole
vocabulary: FR-Spec (2025) and EAGLE-3 draft over the most frequent tokens (EAGLE-3: 32k of Llama-3's
128k). Here the V' most frequent tokens of the tokenised training split are the heads' vocabulary.

What each part does with it:
- **ranking**: ``frequency_ranking`` orders the ids by their count in the training split, most frequent
  first, ties by the smaller id: a pure function of the split, so the same corpus and tokenizer give
  the same V' ids. They are a buffer of the heads (``CPHeads.draft_ids``) and travel in every
  checkpoint.
- **unembedding**: the heads' products use the rows U[draft_ids] (a gather of the shared, possibly tied
  U: gradients flow back into those rows), never all V rows.
- **loss**: every rarer token becomes one extra class, "other", whose logit row is a learned vector
  (``CPHeads.other_row``). The heads' factors are distributions over V' + 1 classes, and the joint NLL
  is the NLL of the coarsened targets (each target mapped to itself if it is among the V', else to
  "other"). That keeps every position in the loss (masking positions whose targets are rare would drop
  exactly the positions where the heads should learn to expect a rare token) and keeps the loss a
  proper likelihood, but of a coarser event: the logged NLLs are lower than full-vocabulary NLLs and
  must not be compared with them. ``draft_vocab_coverage`` is logged beside them: the share of targets
  among the V'.
- **distillation**: the base model's next-token distribution renormalised over the V' (its logits at
  those rows only, no full-V product) against the heads' marginal over the V', also renormalised (the
  "other" mass divided out): KL(p_base|V' || q_s|V'). The heads' "other" mass is trained by the
  cross-entropy and joint terms only.
- **decoding**: the draft distribution is the heads' mixture over the V' alone (the "other" row is
  left out and the rest renormalised), and drafts map back to full-vocabulary ids. As a distribution
  over the full vocabulary q is zero outside the V': the acceptance rule min(1, p/q) never sees such a
  draft, and the residual max(0, p - q) keeps all of p there, so sampled output keeps the verifier's
  distribution exactly, and greedy output is the verifier's argmax chain as ever. The verifier must
  cover the full vocabulary: ``lm_head`` does; ``marginal`` (the heads' own offset-1) does not and is
  refused. A draft conditions its expert posterior on the last emitted token c through P_a^(1)(c); when
  c is not among the V' the heads' V'-only factors have no value for it, and the prior router weights
  are used instead (any draft distribution is exact; this one only affects acceptance).

Shape legend: V full vocabulary, V' draft vocabulary, N positions.
"""

from __future__ import annotations

import numpy as np
import torch


def frequency_ranking(counts: np.ndarray | torch.Tensor, k: int) -> torch.Tensor:
    """The k most frequent ids (k,) int64, most frequent first, ties broken by the smaller id.

    >>> frequency_ranking(np.array([5, 0, 7, 5, 1]), 3).tolist()
    [2, 0, 3]
    """
    counts = torch.as_tensor(np.asarray(counts), dtype=torch.long)  # (V,)
    if not 0 < k <= counts.shape[0]:
        raise ValueError(f"a draft vocabulary of {k} tokens must be between 1 and the vocabulary size "
                         f"{counts.shape[0]}")
    ids = torch.arange(counts.shape[0])
    # a stable sort of ids (already ascending) by descending count: equal counts keep id order
    order = torch.sort(-counts, stable=True).indices
    return ids[order[:k]].clone()


def column_of(draft_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(V,) int64: the column of each token id among the V' draft ids, V' ("other") for the rest.

    >>> column_of(torch.tensor([2, 0]), 4).tolist()
    [1, 2, 0, 2]
    """
    kp = draft_ids.shape[0]
    table = torch.full((vocab_size,), kp, dtype=torch.long, device=draft_ids.device)  # (V,)
    table[draft_ids] = torch.arange(kp, device=draft_ids.device)
    return table
