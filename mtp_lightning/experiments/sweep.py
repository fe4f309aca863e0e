"""``python -m mtp_lightning sweep``: one run per grid point, each measured, then one report.

A sweep file holds a single top-level ``sweep:`` mapping (``SweepConfig`` below); it is not a run
config. Its ``configs`` and ``base`` give the run config every point shares, ``grid`` maps dotted run
config keys to the values to try (the cartesian product is taken), and ``extra_points`` adds single
points such as the ablation without the balancing loss.

Every point is an ordinary run directory ``<root>/<name>/<point>/`` trained by ``train.fit`` in this
process, one after another. A point is finished when its folder holds ``metrics.json``, written
atomically after training and measurement, so a sweep that was interrupted resumes: finished points are
skipped, an unfinished one continues from its newest checkpoint (``fit --resume last``), and one that
died before its first checkpoint starts over. The report (``report.py``) is rebuilt at the end from the
``metrics.json`` files alone, so it also describes a partial sweep.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mtp_lightning.atomic import write_text
from mtp_lightning.config import check_keys, flatten, load_config, load_yaml, to_dict
from mtp_lightning.errors import UserError, closest
from mtp_lightning.machine import describe_machine

# the corpus each data.kind uses by default: the other one is measured too, in bits per byte
OTHER_CORPUS = {"code": ("text", "shakespeare"), "text": ("code", "stdlib")}


@dataclass
class MeasureConfig:
    n_prompts: int = 4
    """Held-out prompts decoded by the AR / speculative benchmark (``dm.val_prompts``)."""
    prompt_len: int = 64
    max_new_tokens: int = 64
    val_batches: int = 8
    """Held-out batches for the losses, bits per byte and mixture statistics."""
    other_corpus: bool = True
    """Also measure bits per byte on the other embedded corpus' held-out split (code <-> text)."""
    other_max_bytes: int = 3_000_000
    """Bytes of the other corpus read (its held-out split is a hash-chosen share of them)."""
    hf_baseline: bool = True
    """With a Hugging Face backbone, also time transformers' own greedy ``generate`` on the same prompts
    (batch 1, eos off) and report the speedup over it (``speedup_over_hf_greedy``)."""


@dataclass
class SweepConfig:
    name: str = "sweep"
    """Folder of the sweep under ``root``; ``--quick`` appends ``-quick``."""
    root: str = "runs/sweeps"
    configs: list = field(default_factory=list)
    """Run config files every point starts from, relative to the sweep file's folder."""
    base: Any = field(default_factory=dict)
    """Run config values every point shares (nested or dotted keys), over ``configs``."""
    grid: Any = field(default_factory=dict)
    """Dotted run config key -> list of values; one point per combination."""
    extra_points: Any = field(default_factory=list)
    """Further points, each a mapping of dotted run config keys to values, over ``base``."""
    equal_time_budget_s: float = 0.0
    """Training seconds at which ranks are compared at equal time; 0: the fastest grid point's total."""
    threads: int = 0
    """torch threads for training and measuring (0: torch's default). On a shared CPU, 1 avoids
    OpenMP threads spinning against other jobs."""
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    quick: Any = field(default_factory=dict)
    """Sweep settings (any of the above) that ``--quick`` merges over the rest: a small, fast variant."""


SWEEP_KEYS = {f.name for f in dataclasses.fields(SweepConfig)}
MEASURE_KEYS = {f.name for f in dataclasses.fields(MeasureConfig)}


class SweepStopped(UserError):
    def __init__(self, signum: int, point: str):
        super().__init__(f"sweep stopped by signal {signum} during '{point}' (its last.ckpt is saved); run the "
                         f"same command again to resume (finished points are skipped)")
        self.exit_code = 128 + signum


@dataclass
class Point:
    name: str
    overrides: dict[str, Any]
    """Dotted run config key -> value that set this point apart from ``base``."""
    extra: bool = False


def _check_sweep_keys(d: dict, origin: str) -> None:
    for key, value in d.items():
        if key not in SWEEP_KEYS:
            raise UserError(f"unknown sweep key '{key}' in {origin}{closest(key, SWEEP_KEYS)}; the keys "
                            f"are {', '.join(sorted(SWEEP_KEYS))}")
        if key == "measure" and isinstance(value, dict):
            for k in value:
                if k not in MEASURE_KEYS:
                    raise UserError(f"unknown sweep key 'measure.{k}' in {origin}{closest(k, MEASURE_KEYS)}")
        if key == "quick" and isinstance(value, dict):
            _check_sweep_keys(value, f"{origin} (quick)")


def load_sweep(path: str, overrides: list[str] | None = None, quick: bool = False) -> tuple[SweepConfig, Path]:
    """The sweep of ``path`` (with ``sweep.*`` overrides, and ``quick`` merged when asked)."""
    data = load_yaml(path)
    if set(data) != {"sweep"}:
        raise UserError(f"'{path}' is not a sweep file: it must hold one top-level 'sweep:' mapping (found "
                        f"{', '.join(sorted(data)) or 'nothing'}); run configs go to `fit --config`")
    raw = OmegaConf.create(data["sweep"] or {})
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise UserError(f"override '{bad[0]}' is not of the form key=value (e.g. sweep.root=runs/mine)")
        dl = OmegaConf.to_container(OmegaConf.from_dotlist(overrides))["sweep"]
        _check_sweep_keys(dl, "the command line")
        raw = OmegaConf.merge(raw, dl)
    sweep = OmegaConf.to_container(raw)
    _check_sweep_keys(sweep, f"'{path}'")
    if quick:
        q = sweep.pop("quick", {}) or {}
        sweep = OmegaConf.to_container(OmegaConf.merge(sweep, q))
        sweep["name"] = f"{sweep.get('name', SweepConfig.name)}-quick"
    sweep.pop("quick", None)
    try:
        cfg: SweepConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepConfig), sweep))
    except Exception as e:  # a wrong type: one line naming the value
        raise UserError(f"invalid sweep in '{path}': {str(e).splitlines()[0]}") from None
    if not isinstance(cfg.grid, dict) or not cfg.grid:
        raise UserError(f"sweep.grid in '{path}' must map run config keys to lists of values, e.g. "
                        f"grid: {{model.heads.rank: [1, 2, 4, 8]}}")
    # dotted and nested spellings (YAML, `sweep.grid.model.heads.rank=[1,2]`) become dotted keys
    cfg.grid = check_keys(cfg.grid, "sweep.grid")
    return cfg, Path(path).resolve().parent


def _label(key: str, value: Any) -> str:
    leaf = key.split(".")[-1]
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return f"{leaf}{text}" if isinstance(value, (int, float)) and not isinstance(value, bool) else f"{leaf}-{text}"


def expand_points(cfg: SweepConfig) -> list[Point]:
    grid = check_keys(cfg.grid, "sweep.grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"sweep.grid.{key}={values!r} must be a non-empty list of values")
    points = [Point("_".join(_label(k, v) for k, v in zip(grid, combo)), dict(zip(grid, combo)))
              for combo in itertools.product(*grid.values())]
    for i, extra in enumerate(cfg.extra_points or []):
        if not isinstance(extra, dict) or not extra:
            raise UserError(f"sweep.extra_points[{i}] must be a mapping of run config keys to values")
        flat = check_keys(extra, f"sweep.extra_points[{i}]")
        points.append(Point("_".join(_label(k, v) for k, v in flat.items()), flat, extra=True))
    names = [p.name for p in points]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"sweep points {dup} appear twice; remove the duplicate from grid or extra_points")
    return points


def _dotlist(overrides: dict[str, Any]) -> list[str]:
    def fmt(v) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        return json.dumps(v) if isinstance(v, str) and not v.replace("_", "").replace("-", "").isalnum() else str(v)

    return [f"{k}={fmt(v)}" for k, v in overrides.items()]


class Sweep:
    """The resolved sweep: where it lives, its points, and the run config of each point."""

    def __init__(self, cfg: SweepConfig, folder: Path, run_overrides: list[str]):
        self.cfg, self.points = cfg, expand_points(cfg)
        self.dir = Path(cfg.root) / cfg.name
        self.files = [str(folder / f) for f in cfg.configs]
        axes = set(flatten(cfg.grid))
        clash = [o.split("=", 1)[0] for o in run_overrides if o.split("=", 1)[0].strip() in axes]
        if clash:
            raise UserError(f"{clash[0]} is a grid axis of this sweep; change sweep.grid instead of "
                            f"overriding it for every point")
        self.base_overrides = _dotlist(check_keys(cfg.base or {}, "sweep.base")) + list(run_overrides)

    def overrides(self, p: Point) -> list[str]:
        return [*self.base_overrides, *_dotlist(p.overrides), f"run.root={self.dir}", f"run.name={p.name}",
                "trainer.progress_bar=false"]

    def run_config(self, p: Point):
        return load_config(self.files, self.overrides(p))


# ---- measuring one finished run ---------------------------------------------------------------------

def tensorboard_curves(run_dir: Path) -> dict:
    """Validation curves by step, and the training time per step, from the run's TensorBoard files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])

    def series(tag: str) -> list[tuple[int, float]]:
        by_step = {e.step: e.value for e in ea.Scalars(tag)} if tag in tags else {}  # a resume rewrites steps
        return sorted(by_step.items())

    # median over logging intervals of ThroughputMonitor's train/time: intervals that hold a validation,
    # a checkpoint write or a resume are outliers, so the median is the cost of training alone
    times = [(e.step, e.value) for e in ea.Scalars("train/time")] if "train/time" in tags else []
    rates = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(times, times[1:]) if s1 > s0 and t1 > t0]
    tps = [v for _, v in series("train/device/items_per_sec")]
    curves = {tag: series(tag) for tag in ("val/next_token_nll", "val/joint_nll_per_token",
                                           "spec/mean_acceptance_length")}
    return {"s_per_step": statistics.median(rates) if rates else None,
            "train_tokens_per_s": statistics.median(tps) if tps else None,
            "curves": {tag: {"step": [s for s, _ in v], "value": [x for _, x in v]} for tag, v in curves.items()}}


def measure(run_dir: Path, m: MeasureConfig) -> dict:
    from mtp_lightning.checkpoints.io import load_for_inference, newest_checkpoint
    from mtp_lightning.data import checkpoint_datamodule
    from mtp_lightning.decoding.bench import run_benchmark
    from mtp_lightning.objectives.heldout import heldout_metrics

    ckpt, saved = newest_checkpoint(run_dir)
    step = int(saved["global_step"])
    del saved
    model, tok, cfg = load_for_inference(ckpt)
    dm = checkpoint_datamodule(cfg.data, cfg.tokenizer, model.n_future, cfg.run.seed, tok)
    out: dict[str, Any] = {"step": step, "checkpoint": ckpt.name,
                           "params": sum(p.numel() for p in model.parameters()),
                           "corpus": {"kind": cfg.data.kind, "source": dm.source}}
    out["heldout"] = heldout_metrics(model, dm, m.val_batches)
    if m.other_corpus and cfg.data.kind in OTHER_CORPUS:
        kind, source = OTHER_CORPUS[cfg.data.kind]
        data = dataclasses.replace(cfg.data, kind=kind, source=source, max_bytes=m.other_max_bytes)
        other = checkpoint_datamodule(data, cfg.tokenizer, model.n_future, cfg.run.seed, tok)
        h = heldout_metrics(model, other, m.val_batches)
        out["other_corpus"] = {"kind": kind, "source": source, "bits_per_byte": h["bits_per_byte"],
                               "next_token_nll": h["next_token_nll"]}
    prompts = dm.val_prompts(m.n_prompts, m.prompt_len).tolist()
    bench = run_benchmark(model, prompts, m.max_new_tokens, verifier=cfg.spec.verifier, sampled=True,
                          seed=cfg.run.seed)
    out["decoding"] = {k: v for k, v in bench.items() if k not in ("verifier",)}
    if m.hf_baseline and hasattr(model.trunk, "lm"):
        from mtp_lightning.decoding.bench import hf_greedy_baseline

        hf = hf_greedy_baseline(model, prompts, m.max_new_tokens, tok.eot_id)
        out["decoding"].update(hf_greedy_tokens_per_s=hf["tokens_per_s"],
                               speedup_over_hf_greedy=bench["spec_tokens_per_s"] / hf["tokens_per_s"])
    out.update(tensorboard_curves(run_dir))
    return out


# ---- running ----------------------------------------------------------------------------------------

def _config_differs(saved: Path, expected) -> str | None:
    """The first run config key whose saved value differs from what the sweep would give now."""
    ignore = {"model.gpt.vocab_size", "trainer.progress_bar"}
    old = flatten(OmegaConf.to_container(OmegaConf.load(saved)))
    new = flatten(to_dict(expected))
    for key, value in new.items():
        if key not in ignore and key in old and old[key] != value:
            return f"{key}: trained with {old[key]!r}, the sweep now gives {value!r}"
    return None


def run_sweep(path: str, overrides: list[str], quick: bool = False, report_only: bool = False) -> Path:
    """Train, measure and report every point of the sweep file ``path``; returns the sweep folder."""
    sweep_over = [o for o in overrides if o.startswith("sweep.")]
    cfg, folder = load_sweep(path, sweep_over, quick)
    sweep = Sweep(cfg, folder, [o for o in overrides if not o.startswith("sweep.")])
    configs = {p.name: sweep.run_config(p) for p in sweep.points}  # every point is checked before any runs
    # torch and Lightning only now, so a mistake in the sweep file or an override costs no heavy imports
    import torch

    from mtp_lightning.checkpoints.io import newest_checkpoint
    from mtp_lightning.experiments.report import write_report
    from mtp_lightning.training.train import fit

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    sweep.dir.mkdir(parents=True, exist_ok=True)
    record = {"command": f"python -m mtp_lightning sweep --config {path}{' --quick' if quick else ''}"
                         + "".join(f" {o}" for o in overrides),
              "sweep": dataclasses.asdict(cfg), "points": [dataclasses.asdict(p) for p in sweep.points],
              "run_overrides": sweep.base_overrides, "config_files": cfg.configs}
    if report_only and (sweep.dir / "sweep.json").is_file():
        record = json.loads((sweep.dir / "sweep.json").read_text(encoding="utf-8"))  # the command that ran
    else:
        write_text(sweep.dir / "sweep.json", json.dumps(record, indent=2, default=str) + "\n")
    for i, p in enumerate(sweep.points if not report_only else []):
        run_dir = sweep.dir / p.name
        tag = f"[{i + 1}/{len(sweep.points)}] {p.name}"
        if (run_dir / "config.yaml").is_file():
            why = _config_differs(run_dir / "config.yaml", configs[p.name])
            if why:
                raise UserError(f"sweep point '{run_dir}' was run with another config ({why}); delete "
                                f"that folder or pick another sweep.name")
        if (run_dir / "metrics.json").is_file():
            print(f"{tag}: finished, skipped", flush=True)
            continue
        newest = newest_checkpoint(run_dir)
        if run_dir.is_dir() and newest is None:
            shutil.rmtree(run_dir)  # died before its first checkpoint: nothing in it can be resumed
        resume, status = (str(newest[0]), f"resuming from step {newest[1]['global_step']}") if newest \
            else (None, "training")
        del newest  # the loaded checkpoint: fit reads it again
        print(f"{tag}: {status}", flush=True)
        t0 = time.perf_counter()
        _, stop = fit(sweep.files, sweep.overrides(p), resume)
        if stop.received is not None:
            raise SweepStopped(int(stop.received), p.name)
        fit_s = time.perf_counter() - t0
        print(f"{tag}: trained in {fit_s:.0f} s; measuring", flush=True)
        t0 = time.perf_counter()
        metrics = measure(run_dir, cfg.measure)
        metrics.update({"name": p.name, "overrides": p.overrides, "extra": p.extra, "fit_wall_s": fit_s,
                        "measure_wall_s": time.perf_counter() - t0, "machine": describe_machine()})
        write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_report(sweep.dir, record, [p.name for p in sweep.points], cfg.equal_time_budget_s)
    print(f"report: {sweep.dir / 'report.md'}", flush=True)
    return sweep.dir
