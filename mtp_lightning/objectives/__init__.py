"""The training objectives, as pure functions of tensors: the CP joint likelihood with its balancing
losses (``cp_loss``), per-offset distillation from a frozen base model (``distill``), and the draft
tuning of offsets 2..n on the model's own greedy continuations (``draft_tuning``). No Lightning here."""
