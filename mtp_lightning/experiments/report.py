"""The report of a sweep: ``report.md``, ``report.json`` and PNG plots, from the points' ``metrics.json``.

The four claims of the paper are judged by fixed rules on the held-out numbers, stated here and in the
report so a reader can disagree with the rule rather than with the wording:

- joint loss falls with rank / acceptance rises with rank: ``confirmed`` when the value moves the
  claimed way from the lowest to the highest rank by more than the tolerance and no step between
  neighbouring ranks goes the other way by more than it; ``mixed`` when the ends move the claimed way
  but a step in between does not; ``not confirmed`` otherwise. Acceptance is judged greedy and sampled;
  both must agree for a plain verdict.
- next-token loss does not change with rank: ``confirmed`` when its spread over ranks is at most
  FLAT_TOL, ``mixed`` up to 3 * FLAT_TOL, ``not confirmed`` beyond.
- balancing keeps experts alive: the ablation without the balancing loss against the same point with
  it. ``confirmed`` when the ablation has more dead experts or under 75% of the effective experts
  (exp of the entropy of the mean router weights), ``not confirmed`` when it keeps at least 90% and no
  more dead experts, ``mixed`` in between.

Equal wall-clock time: each run's training seconds per step is the median over its logging intervals
(validation, checkpoints and resumes excluded); a budget of T seconds is T / that many steps, and the
run is judged by its last validation at or before that step. The learning-rate schedule of such a
partial run has not decayed, which favours runs that finish their schedule inside the budget.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from mtp_lightning.atomic import write_bytes, write_text
from mtp_lightning.machine import machine_line

RANK = "model.heads.rank"
BALANCE = "model.loss.balance"
LOSS_TOL = 0.02  # nats per token
FLAT_TOL = 0.05  # nats per token
ACC_TOL = 0.03  # tokens per step


def trend(values: list[float], sign: int, tol: float) -> str:
    """Verdict for 'values (ordered by rank) move in direction ``sign``' (+1 rise, -1 fall)."""
    if len(values) < 2:
        return "not tested"
    moves = [sign * (b - a) for a, b in zip(values, values[1:])]
    if sign * (values[-1] - values[0]) <= tol:
        return "not confirmed"
    return "confirmed" if all(m >= -tol for m in moves) else "mixed"


def _combine(verdicts: list[str]) -> str:
    vs = [v for v in verdicts if v != "not tested"]
    if not vs:
        return "not tested"
    return vs[0] if all(v == vs[0] for v in vs) else "mixed"


def rank_series(points: list[dict]) -> list[list[dict]]:
    """Finished grid points with a rank, grouped by every other override and sorted by rank."""
    groups: dict[str, list[dict]] = {}
    for p in points:
        if p.get("metrics") and not p["extra"] and RANK in p["overrides"]:
            rest = {k: v for k, v in p["overrides"].items() if k != RANK}
            groups.setdefault(json.dumps(rest, sort_keys=True), []).append(p)
    return [sorted(g, key=lambda p: p["overrides"][RANK]) for g in groups.values() if len(g) >= 2]


def _fmt(x, nd=3) -> str:
    if isinstance(x, float) and abs(x) < 0.5 * 10 ** -nd:
        x = 0.0  # not "-0.000" for a rank-1 router's entropy
    return "—" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _series_text(g: list[dict], get, nd=3) -> str:
    return ", ".join(f"r={p['overrides'][RANK]}: {_fmt(get(p['metrics']), nd)}" for p in g)


def ablation_pairs(points: list[dict]) -> list[tuple[dict, dict]]:
    """(with balancing, without) pairs: an extra point with balance=none and its grid twin."""
    pairs = []
    for p in points:
        if p["extra"] and p["overrides"].get(BALANCE) == "none" and p.get("metrics"):
            want = {k: v for k, v in p["overrides"].items() if k != BALANCE}
            twin = [q for q in points if not q["extra"] and q["overrides"] == want and q.get("metrics")]
            if twin:
                pairs.append((twin[0], p))
    return pairs


def judge_claims(points: list[dict]) -> list[dict]:
    series = rank_series(points)
    out = []
    h = lambda m: m["heldout"]  # noqa: E731
    d = lambda m: m["decoding"]  # noqa: E731

    v = _combine([trend([h(p["metrics"])["joint_nll_per_token"] for p in g], -1, LOSS_TOL) for g in series])
    out.append({"claim": "The joint loss falls as the rank rises", "verdict": v,
                "evidence": "; ".join("held-out joint NLL per token " + _series_text(
                    g, lambda m: h(m)["joint_nll_per_token"]) for g in series)})

    verdicts, texts = [], []
    for g in series:
        nll = [h(p["metrics"])["next_token_nll"] for p in g]
        spread = max(nll) - min(nll)
        verdicts.append("confirmed" if spread <= FLAT_TOL else "mixed" if spread <= 3 * FLAT_TOL
                        else "not confirmed")
        texts.append(f"held-out next-token NLL {_series_text(g, lambda m: h(m)['next_token_nll'])} "
                     f"(spread {spread:.3f} nats; tolerance {FLAT_TOL})")
    out.append({"claim": "The next-token loss does not change with rank", "verdict": _combine(verdicts),
                "evidence": "; ".join(texts)})

    verdicts, texts = [], []
    for g in series:
        for mode, key in (("greedy", "mean_acceptance_length"), ("sampled", "sampled_mean_acceptance_length")):
            verdicts.append(trend([d(p["metrics"])[key] for p in g], +1, ACC_TOL))
            texts.append(f"{mode} mean acceptance length {_series_text(g, lambda m: d(m)[key], 2)}")
    out.append({"claim": "Acceptance rises with rank", "verdict": _combine(verdicts), "evidence": "; ".join(texts)})

    verdicts, texts = [], []
    for with_b, without in ablation_pairs(points):
        a, b = h(with_b["metrics"]), h(without["metrics"])
        ratio = b["effective_experts"] / max(a["effective_experts"], 1e-9)
        verdicts.append("confirmed" if b["dead_experts"] > a["dead_experts"] or ratio < 0.75 else
                        "not confirmed" if ratio >= 0.9 and b["dead_experts"] <= a["dead_experts"] else "mixed")
        texts.append(f"{with_b['name']} vs {without['name']}: effective experts {a['effective_experts']:.2f} vs "
                     f"{b['effective_experts']:.2f}, dead experts {a['dead_experts']} vs {b['dead_experts']}, "
                     f"busiest expert's share {a['busiest_share']:.2f} vs {b['busiest_share']:.2f}, joint NLL "
                     f"per token {a['joint_nll_per_token']:.3f} vs {b['joint_nll_per_token']:.3f}, greedy "
                     f"acceptance length {d(with_b['metrics'])['mean_acceptance_length']:.2f} vs "
                     f"{d(without['metrics'])['mean_acceptance_length']:.2f}")
    out.append({"claim": "The balancing loss keeps the experts alive", "verdict": _combine(verdicts),
                "evidence": "; ".join(texts) or "no finished ablation with model.loss.balance=none"})
    for c in out:
        if c["verdict"] == "not tested" and not c["evidence"]:
            c["evidence"] = f"needs at least two finished grid points that differ only in {RANK}"
    return out


def equal_time(points: list[dict], budget_s: float) -> dict:
    """Every finished point's validation metrics after ``budget_s`` seconds of training (see module doc)."""
    done = [p for p in points if p.get("metrics") and p["metrics"].get("s_per_step")]
    totals = [p["metrics"]["step"] * p["metrics"]["s_per_step"] for p in done if not p["extra"]]
    budget = budget_s or (min(totals) if totals else 0.0)
    rows = []
    for p in done:
        m = p["metrics"]
        reached = budget / m["s_per_step"]
        row = {"name": p["name"], "s_per_step": m["s_per_step"], "steps_in_budget": min(reached, m["step"])}
        for tag in ("val/next_token_nll", "val/joint_nll_per_token", "spec/mean_acceptance_length"):
            c = m["curves"][tag]
            idx = [i for i, s in enumerate(c["step"]) if s <= reached + 1]
            row[tag] = c["value"][idx[-1]] if idx else None
            row[f"{tag}@step"] = c["step"][idx[-1]] if idx else None
        rows.append(row)
    return {"budget_s": budget, "rows": rows}


# ---- plots ------------------------------------------------------------------------------------------

def _figure(n: int, width: float = 5.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * n, 3.8))
    FigureCanvasAgg(fig)  # Agg without touching pyplot's global backend
    return fig, fig.subplots(1, n, squeeze=False)[0]


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_bytes(path, buf.getvalue())


def _against_rank(ax, points, get, label, marker="o") -> None:
    for g in rank_series(points):
        ranks = [p["overrides"][RANK] for p in g]
        ax.plot(ranks, [get(p["metrics"]) for p in g], marker=marker, label=label)
    for with_b, without in ablation_pairs(points):
        ax.plot([without["overrides"][RANK]], [get(without["metrics"])], "kx", ms=9)


def plot_all(folder: Path, points: list[dict], et: dict) -> list[str]:
    series = rank_series(points)
    written = []
    if series:
        ranks = sorted({p["overrides"][RANK] for g in series for p in g})
        fig, (ax1, ax2) = _figure(2)
        _against_rank(ax1, points, lambda m: m["heldout"]["joint_nll_per_token"], "joint NLL / token")
        _against_rank(ax2, points, lambda m: m["heldout"]["next_token_nll"], "next-token NLL")
        for ax, title in ((ax1, "joint NLL per token"), (ax2, "next-token NLL")):
            ax.set(xscale="log", xticks=ranks, xticklabels=[str(r) for r in ranks], xlabel="rank r",
                   ylabel="nats (held-out)", title=f"{title} (x: no balancing)")
            ax.minorticks_off()
        _save(fig, folder / "loss_vs_rank.png")
        fig, (ax,) = _figure(1, 6)
        _against_rank(ax, points, lambda m: m["decoding"]["mean_acceptance_length"], "greedy")
        _against_rank(ax, points, lambda m: m["decoding"]["sampled_mean_acceptance_length"], "sampled", "s")
        ax.set(xscale="log", xticks=ranks, xticklabels=[str(r) for r in ranks], xlabel="rank r",
               ylabel="tokens per verification step", title="mean acceptance length (x: no balancing)")
        ax.minorticks_off()
        ax.legend()
        _save(fig, folder / "acceptance_vs_rank.png")
        written += ["loss_vs_rank.png", "acceptance_vs_rank.png"]
    done = [p for p in points if p.get("metrics")]
    if done:
        fig, (ax1, ax2) = _figure(2)
        for p in done:
            dec = p["metrics"]["decoding"]
            pos = list(range(1, len(dec["per_position"]) + 1))
            line, = ax1.plot(pos, dec["per_position"], marker="o", label=p["name"])
            ax2.plot(pos, dec["sampled_per_position"], marker="s", color=line.get_color(), label=p["name"])
        for ax, mode in ((ax1, "greedy"), (ax2, "sampled")):
            ax.set(xlabel="draft position j", ylabel="acceptance rate", ylim=(0, 1), xticks=pos,
                   title=f"per-position acceptance, {mode}")
        ax1.legend(fontsize=8)
        _save(fig, folder / "per_position.png")
        written.append("per_position.png")
    pairs = ablation_pairs(points)
    if pairs:
        fig, axes = _figure(2 * len(pairs))
        for k, (with_b, without) in enumerate(pairs):
            for ax, key, what in ((axes[2 * k], "expert_wins", "share of positions it wins"),
                                  (axes[2 * k + 1], "expert_weight", "mean router weight")):
                for i, (p, label) in enumerate(((with_b, "with balancing"), (without, "without"))):
                    use = sorted(p["metrics"]["heldout"][key], reverse=True)
                    ax.bar([j + (i - 0.5) * 0.4 for j in range(len(use))], use, width=0.4, label=label)
                ax.set(xlabel="expert (sorted by use)", ylabel=what,
                       title=f"expert usage, r={without['overrides'][RANK]}")
                ax.legend()
        _save(fig, folder / "expert_usage.png")
        written.append("expert_usage.png")
    timed = [p for p in done if p["metrics"].get("s_per_step")]
    if timed:
        fig, (ax1, ax2) = _figure(2)
        for p in timed:
            m = p["metrics"]
            for ax, tag in ((ax1, "val/next_token_nll"), (ax2, "spec/mean_acceptance_length")):
                c = m["curves"][tag]
                ax.plot([s * m["s_per_step"] for s in c["step"]], c["value"], marker=".", label=p["name"])
        for ax, title in ((ax1, "held-out next-token NLL"), (ax2, "greedy mean acceptance length")):
            ax.axvline(et["budget_s"], color="grey", ls="--")
            ax.set(xlabel="training seconds", title=f"{title} (during training)")
        ax1.legend(fontsize=8)
        _save(fig, folder / "equal_time.png")
        written.append("equal_time.png")
    return written


# ---- markdown and json ------------------------------------------------------------------------------

def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows])


def markdown(record: dict, points: list[dict], claims: list[dict], et: dict, plots: list[str]) -> str:
    done = [p for p in points if p.get("metrics")]
    missing = [p["name"] for p in points if not p.get("metrics")]
    mach = done[0]["metrics"]["machine"] if done else {}
    out = [f"# Sweep `{record['sweep']['name']}`", "",
           f"Command: `{record['command']}`", "",
           f"Machine: {machine_line(mach) if mach else '?'}.", "",
           f"Points: {len(done)} of {len(points)} finished." + (f" Missing: {', '.join(missing)}." if missing else ""),
           "", "## Held-out losses and throughput", ""]
    other = next((p["metrics"]["other_corpus"]["source"] for p in done if "other_corpus" in p["metrics"]), None)
    n = max((len(p["metrics"]["heldout"]["offset_nll"]) for p in done), default=0)
    header = ["run", "steps", "params", "train tok/s", "s/step", "joint NLL/tok", "next-token NLL",
              "bits/byte"] + ([f"bits/byte {other}"] if other else []) + [f"NLL +{s + 1}" for s in range(n)]
    rows = []
    for p in done:
        m, h = p["metrics"], p["metrics"]["heldout"]
        rows.append([p["name"], m["step"], m["params"], m["train_tokens_per_s"], m["s_per_step"],
                     h["joint_nll_per_token"], h["next_token_nll"], h["bits_per_byte"]]
                    + ([m.get("other_corpus", {}).get("bits_per_byte")] if other else []) + h["offset_nll"])
    out += [_table(header, rows), "", "## Decoding and the mixture", ""]
    hf = any("speedup_over_hf_greedy" in p["metrics"]["decoding"] for p in done)
    header = ["run", "greedy tau", "greedy acc. rate", "greedy per position", "sampled tau", "sampled acc. rate",
              "sampled per position", "speedup (greedy)", *(["speedup over transformers greedy"] if hf else []),
              "identical to AR", "router entropy", "busiest share", "effective experts", "dead experts"]
    rows = [[p["name"], d["mean_acceptance_length"], d["acceptance_rate"], _positions(d.get("per_position")),
             d["sampled_mean_acceptance_length"], d["sampled_acceptance_rate"],
             _positions(d.get("sampled_per_position")), d["speedup"],
             *([d.get("speedup_over_hf_greedy")] if hf else []), d["identical"], h["router_entropy"],
             h["busiest_share"], h["effective_experts"], h["dead_experts"]]
            for p in done for d, h in [(p["metrics"]["decoding"], p["metrics"]["heldout"])]]
    out += [_table(header, rows), "", "## The paper's claims", ""]
    out += [f"- **{c['claim']}: {c['verdict']}.** {c['evidence']}." for c in claims]
    out += ["", f"Rules: loss tolerance {LOSS_TOL} nats, flatness tolerance {FLAT_TOL} nats, acceptance "
            f"tolerance {ACC_TOL} tokens (see `mtp_lightning/experiments/report.py`).", "",
            f"## Equal training time ({et['budget_s']:.1f} s)", "",
            "Each run is read at its last validation within the budget: seconds per step is the median over "
            "logging intervals (validation, checkpoints and resumes excluded). A partial run's learning rate "
            "has not decayed yet, which favours the runs that finish inside the budget.", ""]
    out.append(_table(["run", "s/step", "steps in budget", "val step", "next-token NLL", "joint NLL/tok",
                       "greedy tau (in training)"],
                      [[r["name"], r["s_per_step"], int(r["steps_in_budget"]), r["val/next_token_nll@step"],
                        r["val/next_token_nll"], r["val/joint_nll_per_token"], r["spec/mean_acceptance_length"]]
                       for r in et["rows"]]))
    out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    out += ["", "Definitions: NLLs are nats per token on held-out windows of the training corpus (the other "
            "corpus only in bits per byte, which does not depend on the tokenizer); tau is tokens emitted per "
            "verification step (accepted drafts + 1); acceptance rate is accepted / drafted tokens; speedup is "
            "speculative over autoregressive tokens/s, both with a KV cache, on the same held-out prompts (over "
            "transformers' own greedy `generate` in its own column, for a Hugging Face backbone); "
            "effective experts is exp of the entropy of the mean router weights.", ""]
    return "\n".join(out)


def _positions(values) -> str:
    """Per-position acceptance rates as one cell: ``0.297 / 0.091 / 0.047``."""
    return " / ".join(f"{v:.3f}" for v in values) if values else "-"


def write_report(folder: Path, record: dict, names: list[str], budget_s: float = 0.0) -> dict:
    """Read every point's metrics.json under ``folder`` and write report.md, report.json and the plots."""
    points = []
    for spec in record["points"]:
        path = folder / spec["name"] / "metrics.json"
        metrics = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        points.append({**spec, "metrics": metrics})
    assert [p["name"] for p in points] == names
    claims = judge_claims(points)
    et = equal_time(points, budget_s)
    plots = plot_all(folder, points, et)
    report = {"command": record["command"], "sweep": record["sweep"], "claims": claims, "equal_time": et,
              "plots": plots, "missing": [p["name"] for p in points if not p["metrics"]],
              "points": [{"name": p["name"], "overrides": p["overrides"], "extra": p["extra"],
                          "metrics": p["metrics"]} for p in points]}
    write_text(folder / "report.json", json.dumps(report, indent=2) + "\n")
    write_text(folder / "report.md", markdown(record, points, claims, et, plots))
    return report
