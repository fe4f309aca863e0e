"""Where a heads-only training step goes, on the real model: the SmolLM2 preset's step, part by part.

Builds the run of ``conf/finetune_smollm2.yaml`` (or ``--config``) as ``fit`` does (the corpus, the
model's own tokenizer, the draft vocabulary ranked on the training split), takes one training batch,
and times, under the same autocast as the trainer (``trainer.precision=auto``'s choice), the fastest
of ``--steps`` repeats of:

- ``frozen forward``: the backbone over the batch (no autograd), which the hidden-state cache pays
  once per window instead of every step;
- ``heads``: the CP heads' expert vectors h_{s,a} from the cached hidden states, every offset and
  expert (forward and backward), without the products with the unembedding;
- ``distillation``: ``distill_objective`` forward and backward, which also yields the CP objective's
  factors (the n*r head products with the unembedding are paid here);
- ``CP loss``: ``cp_objective`` on those factors, forward and backward;
- ``step``: the module's whole training step from the cached states (``_terms``, backward, AdamW).

``floor`` is 6 n r N V' D (forward, recomputation and the gradient of h: three products of 2 n r N V' D
FLOP) at the rate of one bf16 or float32 matmul of the chunk's shape measured here, and ``step /
floor`` the step time over it. The peak resident memory of the process is printed at the end.

    python benchmarks/heads_only_breakdown.py                      # the preset, r = 4
    python benchmarks/heads_only_breakdown.py model.heads.rank=8   # any run config override
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

PRESET = Path(__file__).resolve().parent.parent / "conf" / "finetune_smollm2.yaml"


def fastest(fn, steps: int) -> float:
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_rate(rows: int, d: int, cols: int, dtype: torch.dtype, steps: int) -> float:
    """FLOP/s of (rows, d) @ (d, cols) in ``dtype`` with a float32 result, as the loss computes it."""
    a, b = torch.randn(rows, d).to(dtype), torch.randn(cols, d).to(dtype)
    (a @ b.T).float()
    return 2 * rows * d * cols / fastest(lambda: (a @ b.T).float(), steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(PRESET))
    p.add_argument("--steps", type=int, default=3, help="timed repeats of each part (the fastest is kept)")
    p.add_argument("overrides", nargs="*", help="run config overrides (key=value)")
    args = p.parse_args()

    from mtp_lightning.config import load_config
    from mtp_lightning.data.packing import split_window
    from mtp_lightning.machine import describe_machine, machine_line
    from mtp_lightning.objectives.cp_loss import auto_chunk, cp_objective
    from mtp_lightning.training.train import build_data_and_module, resolve_precision

    cfg = load_config([args.config], args.overrides)
    precision, why = resolve_precision(cfg)
    dm, module, _ = build_data_and_module(cfg)
    dm.setup("fit")
    model, lc = module.model, cfg.model.loss
    window = next(iter(dm.train_dataloader()))
    window = window[0] if isinstance(window, (tuple, list)) else window
    inputs, targets = split_window(window, model.n_future)
    B, T = inputs.shape
    bf16 = precision.startswith("bf16")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    module.train()
    opt = torch.optim.AdamW([q for q in module.parameters() if q.requires_grad], lr=cfg.optim.lr)

    with autocast, torch.no_grad():
        z = model.trunk(inputs)  # (B, T, D), the cached states stand in for this
    t_frozen = fastest(lambda: _frozen(model, inputs, autocast), args.steps)
    classes, U = model.head_targets(targets), model.head_unembedding(other=True)

    def heads():
        with autocast:
            states = model.heads.offset_states(z)
            h = [model.heads.expert_vectors(u.reshape(B * T, -1), s) for s, u in enumerate(states)]  # (N, r, D)
        sum(x.float().sum() for x in h).backward()

    def distill():
        with autocast:
            states = model.heads.offset_states(z)
            d = module._distill(inputs, classes, z, states, U, lc)
        d.loss.backward()
        return d

    d = distill()
    factors = d.factors.detach().requires_grad_()

    def cp_loss():
        with autocast:
            states = model.heads.offset_states(z)
            t = cp_objective(model.heads, z, states, U, classes, lc, lm_U=model.unembedding, lm_targets=targets,
                             frozen_rows=model.head_frozen_rows, factors=factors)
        t.loss.backward()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            terms = module._terms((window, z))[-1]
        terms.loss.backward()
        opt.step()

    parts = {"heads": heads, "distillation": distill, "CP loss": cp_loss, "step": step}
    times = {"frozen forward": t_frozen}
    for name, fn in parts.items():
        fn()  # warm-up
        times[name] = fastest(fn, args.steps)
    n, r, D, Vp = model.n_future, model.rank, z.shape[-1], U.shape[0]
    chunk = max(1, (lc.chunk_size or auto_chunk(Vp)) // r)
    rate = matmul_rate(chunk * r, D, Vp, torch.bfloat16 if lc.bf16_unembed else torch.float32, args.steps)
    floor = 6 * n * r * B * T * Vp * D / rate
    print(f"machine: {machine_line(describe_machine())}; precision {precision} ({why})")
    print(f"batch {B} x {T} tokens, n={n}, r={r}, products {Vp} wide (V' = {model.draft_vocab}), D={D}, "
          f"{'bf16' if lc.bf16_unembed else 'float32'} products at {rate / 1e9:.0f} GFLOP/s")
    print(f"{'part':<16} {'seconds':>8} {'tokens/s':>9}")
    for name, s in times.items():
        print(f"{name:<16} {s:>8.3f} {B * T / s:>9.0f}")
    print(f"floor 6nrNV'D    {floor:>8.3f}   step / floor {times['step'] / floor:.2f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def _frozen(model, inputs, autocast) -> None:
    with autocast, torch.no_grad():
        model.trunk(inputs)


if __name__ == "__main__":
    main()
