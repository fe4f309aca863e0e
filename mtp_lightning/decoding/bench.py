"""Speculative decoding against its autoregressive baseline: speed, acceptance, and exactness.

Both decoders run the same prompts, in the same batches, with the same verifier and a KV cache, under
``torch.inference_mode`` with the model in eval mode. A short warm-up run (allocator, kernels, lazy
init) is excluded from the timings. tokens/s counts generated tokens over the wall time of whole
calls, prefill included, so the speedup is what a user would see.
"""

from __future__ import annotations


import torch

from mtp_lightning.atomic import writing
from mtp_lightning.decoding.autoregressive import generate_ar, left_pad
from mtp_lightning.decoding.metrics import SpecAcceptance
from mtp_lightning.decoding.sampling import Sampling
from mtp_lightning.decoding.speculative import generate_speculative, resolve_draft_len, resolve_draft_precision
from mtp_lightning.model import fastpath


def _batches(prompts: list[list[int]], batch_size: int):
    for i in range(0, len(prompts), batch_size):
        yield left_pad(prompts[i:i + batch_size])


def _ms_per_step(runs) -> float:
    return 1e3 * sum(g.seconds - g.prefill_seconds for g in runs) / max(sum(g.steps for g in runs), 1)


def _acceptance(metric: SpecAcceptance, prefix: str = "") -> dict:
    out = metric.summary()
    return {f"{prefix}mean_acceptance_length": float(out["mean_acceptance_length"]),
            f"{prefix}acceptance_rate": float(out["acceptance_rate"]),
            f"{prefix}per_position": out["per_position"].tolist(),
            f"{prefix}histogram": out["histogram"].tolist()}


def run_benchmark(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 1,
                  verifier: str = "marginal", draft_len: int = 0, warmup: bool = True, sampled: bool = False,
                  seed: int = 0, draft_precision: str = "auto") -> dict:
    """Decode ``prompts`` with AR and greedy speculative decoding; see the module docstring."""
    if not prompts:
        raise ValueError("run_benchmark needs at least one prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    k = resolve_draft_len(model, draft_len)
    int8 = resolve_draft_precision(draft_precision, next(model.parameters()).device)
    spec_kw = dict(verifier=verifier, draft_len=k, draft_precision="int8" if int8 else "full")
    was_training = model.training
    model.eval()
    try:
        # one decoding() block around every generation: the weight copies the few-row products use
        # (fastpath) are built once, in the warm-up, as an inference server builds them at load time,
        # instead of in every generation's timed loop; no weight changes inside it
        with torch.inference_mode(), fastpath.decoding():
            if warmup:
                idx, mask = next(_batches(prompts, batch_size))
                generate_ar(model, idx, min(8, max_new_tokens), pad_mask=mask, verifier=verifier)
                generate_speculative(model, idx, min(8, max_new_tokens), pad_mask=mask, **spec_kw)
            ar_runs, sp_runs = [], []
            metric = SpecAcceptance(k)
            for idx, mask in _batches(prompts, batch_size):
                ar_runs.append(generate_ar(model, idx, max_new_tokens, pad_mask=mask, verifier=verifier))
                sp_runs.append(generate_speculative(model, idx, max_new_tokens, pad_mask=mask, **spec_kw))
                metric.update(*sp_runs[-1].step_counts())
            ar_tps = sum(g.n_tokens for g in ar_runs) / sum(g.seconds for g in ar_runs)
            sp_tps = sum(g.n_tokens for g in sp_runs) / sum(g.seconds for g in sp_runs)
            result = {
                "n_prompts": len(prompts), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                "draft_len": k, "verifier": verifier, "draft_precision": spec_kw["draft_precision"],
                "ar_tokens_per_s": ar_tps, "spec_tokens_per_s": sp_tps, "speedup": sp_tps / ar_tps,
                # the cost of one pass after the prefill, which is what acceptance has to pay for
                "ar_ms_per_step": _ms_per_step(ar_runs), "spec_ms_per_step": _ms_per_step(sp_runs),
                "identical": [t for g in ar_runs for t in g.tokens] == [t for g in sp_runs for t in g.tokens],
                **_acceptance(metric),
            }
            if sampled:
                generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
                metric = SpecAcceptance(k)
                for idx, mask in _batches(prompts, batch_size):
                    sp = generate_speculative(model, idx, max_new_tokens, pad_mask=mask, **spec_kw,
                                              sampling=Sampling(temperature=1.0), generator=generator)
                    metric.update(*sp.step_counts())
                result.update(_acceptance(metric, "sampled_"))
    finally:
        model.train(was_training)
    return result


def format_table(result: dict) -> str:
    """A plain two-column table of a ``run_benchmark`` result."""
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        if isinstance(v, list):
            return " ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in v)
        return str(v)

    width = max(len(key) for key in result)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 24}"]
    lines += [f"{key:<{width}}  {fmt(value)}" for key, value in result.items()]
    return "\n".join(lines)


def plot_per_position(result: dict, png_path: str) -> None:
    """Per-position acceptance (bars, greedy and sampled if present) and the histogram, as one PNG.

    Written atomically (``mtp_lightning.atomic``), so a reader never sees half a PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)  # Agg without touching pyplot's global backend
    ax1, ax2 = fig.subplots(1, 2)
    pos = list(range(1, len(result["per_position"]) + 1))
    series = [("greedy", "")] + ([("sampled", "sampled_")] if "sampled_per_position" in result else [])
    width = 0.8 / len(series)
    for i, (label, prefix) in enumerate(series):
        ax1.bar([p + (i - (len(series) - 1) / 2) * width for p in pos], result[f"{prefix}per_position"],
                width=width, label=label)
        hist = result[f"{prefix}histogram"]
        total = max(sum(hist), 1)
        ax2.bar([m + (i - (len(series) - 1) / 2) * width for m in range(len(hist))],
                [h / total for h in hist], width=width, label=label)
    ax1.set(xlabel="draft position j", ylabel="acceptance rate", ylim=(0, 1), xticks=pos,
            title=f"per position (tau = {result['mean_acceptance_length']:.2f})")
    ax2.set(xlabel="accepted drafts per step m", ylabel="share of steps", xticks=list(range(len(pos) + 1)),
            title="acceptance histogram")
    ax1.legend()
    fig.tight_layout()
    with writing(png_path, what="plot") as f:
        fig.savefig(f, format="png", dpi=100)
