"""Speculative decoding against its autoregressive baseline: speed, acceptance, and exactness.

Both decoders run the same prompts, in the same batches, with the same verifier and a KV cache, under
``torch.inference_mode`` with the model in eval mode. A short warm-up run (allocator, kernels, lazy
init) is excluded from the timings. tokens/s counts generated tokens over the wall time of whole
calls, prefill included, so the speedup is what a user would see. Rows stop at ``eos_id`` when one is
given, in both decoders alike.

Timings on a shared machine drift: the two decoders run side by side, batch by batch, in alternating
order (``interleaved_order``), and the whole set is repeated ``repeats`` times; the reported rates and
speedup are medians over the repeats. ``timing_warnings`` says when the repeats disagree, when the
machine was loaded, or when the speedup exceeds tau, which the same model cannot do.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from mtp_lightning.atomic import writing
from mtp_lightning.config import TreeConfig
from mtp_lightning.decoding.autoregressive import generate_ar, left_pad
from mtp_lightning.decoding.metrics import SpecAcceptance
from mtp_lightning.decoding.sampling import Sampling
from mtp_lightning.decoding.speculative import generate_speculative, resolve_draft_len, resolve_draft_precision
from mtp_lightning.decoding.tree import tree_depth, tree_summary
from mtp_lightning.model import fastpath


def _batches(prompts: list[list[int]], batch_size: int):
    for i in range(0, len(prompts), batch_size):
        yield left_pad(prompts[i:i + batch_size])


SPREAD_LIMIT = 1.25
"""Slowest over fastest repeat of one decoder beyond which the timings are called unstable."""
TAU_MARGIN = 1.10
"""A speedup above tau times this is reported as impossible (timing noise, not speculation)."""


def interleaved_order(n_batches: int, repeats: int) -> list[tuple[int, int, str]]:
    """(repeat, batch, decoder) in the order the benchmark runs them: each batch's AR and speculative
    runs next to each other, which one goes first alternating from pair to pair, so a slow spell of a
    busy machine falls on both decoders alike.

    >>> interleaved_order(2, 2)
    [(0, 0, 'ar'), (0, 0, 'spec'), (0, 1, 'spec'), (0, 1, 'ar'), (1, 0, 'ar'), (1, 0, 'spec'), (1, 1, 'spec'), (1, 1, 'ar')]
    """
    order = []
    for pair in range(n_batches * repeats):
        first, second = ("ar", "spec") if pair % 2 == 0 else ("spec", "ar")
        r, b = divmod(pair, n_batches)
        order += [(r, b, first), (r, b, second)]
    return order


def timing_warnings(ar_seconds: list[float], spec_seconds: list[float], speedup: float, tau: float,
                    load: float | None, cores: int) -> list[str]:
    """What makes a benchmark's timings doubtful, one sentence each (empty when nothing does).

    ``ar_seconds``/``spec_seconds``: each repeat's total decoding time; ``load``: the 1-minute load
    average before the run (None where unknown) on ``cores`` usable cores.

    >>> timing_warnings([2.0, 2.1], [1.0, 1.0], 2.05, 2.9, 0.3, 2)
    []
    >>> timing_warnings([2.0, 58.0], [1.0, 1.1], 2.6, 1.18, 3.5, 2)[0]
    'AR runs took 2.00 to 58.00 s over 2 repeats (29.0x apart): the machine was not steady; rerun on a quiet machine or with more --repeats'
    """
    out = []
    for name, seconds in (("AR", ar_seconds), ("speculative", spec_seconds)):
        if len(seconds) > 1 and min(seconds) > 0 and max(seconds) / min(seconds) > SPREAD_LIMIT:
            out.append(f"{name} runs took {min(seconds):.2f} to {max(seconds):.2f} s over {len(seconds)} repeats "
                       f"({max(seconds) / min(seconds):.1f}x apart): the machine was not steady; rerun on a "
                       f"quiet machine or with more --repeats")
    if load is not None and load > cores:
        out.append(f"the machine was loaded before the run (1-minute load average {load:.2f} on {cores} "
                   f"cores): other processes share the CPUs, so the timings may not be this model's")
    if speedup > tau * TAU_MARGIN:
        out.append(f"speedup {speedup:.2f}x exceeds tau {tau:.2f} (tokens per verification pass), which the "
                   f"same model cannot do: a pass costs at least one AR step; the timings were disturbed")
    return out


def machine_load() -> tuple[float | None, int]:
    """``timing_warnings``' ``load`` and ``cores``: the 1-minute load average (None where the system has
    none) and the cores this process may run on. Read it before a benchmark starts its own threads."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return load, cores


def _ms_per_step(runs) -> float:
    runs = list(runs)
    return 1e3 * sum(g.seconds - g.prefill_seconds for g in runs) / max(sum(g.steps for g in runs), 1)


def _acceptance(metric: SpecAcceptance, prefix: str = "") -> dict:
    out = metric.summary()
    return {f"{prefix}mean_acceptance_length": float(out["mean_acceptance_length"]),
            f"{prefix}acceptance_rate": float(out["acceptance_rate"]),
            f"{prefix}per_position": out["per_position"].tolist(),
            f"{prefix}histogram": out["histogram"].tolist()}


def run_benchmark(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 1,
                  verifier: str = "marginal", draft_len: int = 0, warmup: bool = True, sampled: bool = False,
                  seed: int = 0, draft_precision: str = "auto", eos_id: int | None = None,
                  repeats: int = 1, tree: TreeConfig | None = None, temperature: float = 1.0) -> dict:
    """Decode ``prompts`` with AR and greedy speculative decoding; see the module docstring.

    ``sampled``: also the acceptance of sampled speculative decoding at ``temperature`` (a generator
    seeded with ``seed``), under ``sampled_*``.
    ``tree`` (enabled): also greedy tree verification (``tree.py``), one prompt at a time whatever
    ``batch_size`` and once whatever ``repeats``, reported beside the chain under ``tree_*``: its speed
    against the AR runs' median, its exactness, acceptance (draft length: the tree's depth), tree sizes
    and the winners' histogram; with ``sampled``, sampled trees' acceptance, sizes and winners under
    ``tree_sampled_*``."""
    if not prompts:
        raise ValueError("run_benchmark needs at least one prompt")
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size={batch_size} and repeats={repeats} must be >= 1")
    k = resolve_draft_len(model, draft_len)
    int8 = resolve_draft_precision(draft_precision, next(model.parameters()).device)
    spec_kw = dict(verifier=verifier, draft_len=k, draft_precision="int8" if int8 else "full", eos_id=eos_id)
    was_training = model.training
    model.eval()
    try:
        # one decoding() block around every generation: the weight copies the few-row products use
        # (fastpath) are built once, in the warm-up, as an inference server builds them at load time,
        # instead of in every generation's timed loop; no weight changes inside it
        with torch.inference_mode(), fastpath.decoding():
            batches = list(_batches(prompts, batch_size))
            if warmup:
                idx, mask = batches[0]
                generate_ar(model, idx, min(8, max_new_tokens), pad_mask=mask, verifier=verifier, eos_id=eos_id)
                generate_speculative(model, idx, min(8, max_new_tokens), pad_mask=mask, **spec_kw)
            runs = {}  # (repeat, batch, decoder) -> Generation
            for r, b, decoder in interleaved_order(len(batches), repeats):
                idx, mask = batches[b]
                runs[r, b, decoder] = (
                    generate_ar(model, idx, max_new_tokens, pad_mask=mask, verifier=verifier, eos_id=eos_id)
                    if decoder == "ar" else
                    generate_speculative(model, idx, max_new_tokens, pad_mask=mask, **spec_kw))
            ar_runs = [[runs[r, b, "ar"] for b in range(len(batches))] for r in range(repeats)]
            sp_runs = [[runs[r, b, "spec"] for b in range(len(batches))] for r in range(repeats)]
            ar_s = [sum(g.seconds for g in rep) for rep in ar_runs]  # per repeat
            sp_s = [sum(g.seconds for g in rep) for rep in sp_runs]
            ar_tps = [sum(g.n_tokens for g in rep) / s for rep, s in zip(ar_runs, ar_s)]
            sp_tps = [sum(g.n_tokens for g in rep) / s for rep, s in zip(sp_runs, sp_s)]
            # greedy decoding is deterministic: every run of every repeat must give the first AR tokens
            reference = [t for g in ar_runs[0] for t in g.tokens]
            identical = all([t for g in rep for t in g.tokens] == reference for rep in ar_runs + sp_runs)
            metric = SpecAcceptance(k)
            for g in sp_runs[0]:  # one repeat: the others decoded the same tokens in the same steps
                metric.update(*g.step_counts())
            result = {
                "n_prompts": len(prompts), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                "draft_len": k, "verifier": verifier, "draft_precision": spec_kw["draft_precision"],
                "eos_id": eos_id, "generated_tokens": sum(map(len, reference)),
                "repeats": repeats, "ar_tokens_per_s": statistics.median(ar_tps),
                "spec_tokens_per_s": statistics.median(sp_tps),
                "speedup": statistics.median(s / a for s, a in zip(sp_tps, ar_tps)),
                "ar_seconds": ar_s, "spec_seconds": sp_s,
                # the cost of one pass after the prefill, which is what acceptance has to pay for
                "ar_ms_per_step": _ms_per_step(g for rep in ar_runs for g in rep),
                "spec_ms_per_step": _ms_per_step(g for rep in sp_runs for g in rep),
                "identical": identical,
                **_acceptance(metric),
            }
            if tree is not None and tree.enabled:
                result.update(_tree_runs(model, prompts, max_new_tokens, tree, spec_kw, warmup, reference,
                                         statistics.median(ar_tps)))
            if sampled:
                sampling = Sampling(temperature=temperature)
                generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
                metric = SpecAcceptance(k)
                for idx, mask in batches:
                    sp = generate_speculative(model, idx, max_new_tokens, pad_mask=mask, **spec_kw,
                                              sampling=sampling, generator=generator)
                    metric.update(*sp.step_counts())
                result.update(_acceptance(metric, "sampled_"))
                result["sampled_temperature"] = temperature
                if tree is not None and tree.enabled:
                    result.update(_sampled_tree_runs(model, prompts, max_new_tokens, tree, spec_kw, sampling,
                                                     torch.Generator(device=generator.device).manual_seed(seed)))
    finally:
        model.train(was_training)
    return result


def _decode_trees(model, prompts: list[list[int]], max_new_tokens: int, tree: TreeConfig, spec_kw: dict,
                  prefix: str, **kw) -> tuple[list, dict]:
    """Each prompt decoded alone with ``tree`` (draft length: the tree's depth); the runs, and their
    acceptance, mean tree size and winners under ``prefix``."""
    kw = {**spec_kw, "draft_len": tree_depth(model, spec_kw["draft_len"], tree), "tree": tree, **kw}
    runs = [generate_speculative(model, [p], max_new_tokens, **kw) for p in prompts]
    metric = SpecAcceptance(kw["draft_len"])
    for g in runs:
        metric.update(*g.step_counts())
    stats = tree_summary(runs)
    return runs, {**_acceptance(metric, prefix), f"{prefix}mean_size": stats["mean_size"],
                  f"{prefix}max_size": stats["max_size"], f"{prefix}winners": stats["winners"]}


def _tree_runs(model, prompts: list[list[int]], max_new_tokens: int, tree: TreeConfig, spec_kw: dict,
               warmup: bool, ar_tokens: list[list[int]], ar_tps: float) -> dict:
    """``run_benchmark``'s greedy tree columns: timed, and compared with the AR rows."""
    depth = tree_depth(model, spec_kw["draft_len"], tree)
    if warmup:
        generate_speculative(model, [prompts[0]], min(8, max_new_tokens), **{**spec_kw, "draft_len": depth},
                             tree=tree)
    runs, stats = _decode_trees(model, prompts, max_new_tokens, tree, spec_kw, "tree_")
    tps = sum(g.n_tokens for g in runs) / sum(g.seconds for g in runs)
    return {"tree_width": tree.width, "tree_experts": min(tree.experts, model.rank), "tree_depth": depth,
            "tree_budget": tree.budget, "tree_tokens_per_s": tps, "tree_speedup": tps / ar_tps,
            "tree_ms_per_step": _ms_per_step(runs), "tree_identical": [t for g in runs for t in g.tokens] == ar_tokens,
            **stats}


def _sampled_tree_runs(model, prompts: list[list[int]], max_new_tokens: int, tree: TreeConfig, spec_kw: dict,
                       sampling: Sampling, generator: torch.Generator) -> dict:
    """``run_benchmark``'s sampled tree columns (untimed)."""
    stats = _decode_trees(model, prompts, max_new_tokens, tree, spec_kw, "tree_sampled_", sampling=sampling,
                          generator=generator)[1]
    stats.pop("tree_sampled_max_size")
    return stats


def hf_generate(lm, prompt: list[int], max_new_tokens: int, pad_id: int, lookup: int = 0) -> list[int]:
    """transformers' own ``generate(do_sample=False)`` of ``lm`` for one prompt, exactly
    ``max_new_tokens`` tokens (eos off); ``lookup`` > 0: prompt-lookup decoding
    (``prompt_lookup_num_tokens``), transformers' self-speculative method without training."""
    ids = torch.tensor([prompt], device=next(lm.parameters()).device)
    extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
    out = lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                      min_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=pad_id, **extra)
    return out[0, len(prompt):].tolist()


def hf_greedy_baseline(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int) -> dict:
    """Batch-1 greedy decoding of a Hugging Face backbone by transformers itself, the decoder a user
    would otherwise pick: its tokens/s over the same prompts (a warm-up prompt first, not timed).
    ``model``: a CPModel over an HF backbone (``model.trunk.lm``)."""
    lm = model.trunk.lm
    was_training = lm.training
    lm.eval()
    try:
        with torch.inference_mode():
            hf_generate(lm, prompts[0][: max(8, len(prompts[0]) // 2)], min(8, max_new_tokens), pad_id)
            seconds, outputs = 0.0, []
            for p in prompts:
                t0 = time.perf_counter()
                outputs.append(hf_generate(lm, p, max_new_tokens, pad_id))
                seconds += time.perf_counter() - t0
    finally:
        lm.train(was_training)
    return {"tokens_per_s": sum(map(len, outputs)) / seconds, "seconds": seconds, "outputs": outputs}


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
