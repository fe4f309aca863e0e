"""The sweep command: presets, bad sweep files, the claim rules on hand-written numbers, and the
``--quick`` rank sweep end to end (report structure, skip on rerun, resume of an unfinished point)."""

import contextlib
import io
import json
import math
import signal
from pathlib import Path

import pytest

from mtp_lightning.cli import main
from mtp_lightning.errors import UserError
from mtp_lightning.experiments.report import equal_time, judge_claims, trend
from mtp_lightning.experiments.sweep import Sweep, load_sweep

CONF = Path(__file__).resolve().parent.parent / "conf"
PRESETS = ["sweep_rank.yaml", "sweep_rank_text.yaml"]
POINTS = ["rank1", "rank2", "rank4", "rank8", "rank8_balance-none"]
PLOTS = ["loss_vs_rank.png", "acceptance_vs_rank.png", "per_position.png", "expert_usage.png", "equal_time.png"]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("quick", [False, True])
def test_sweep_presets_load_and_every_point_is_a_valid_run(preset, quick):
    cfg, folder = load_sweep(str(CONF / preset), quick=quick)
    sweep = Sweep(cfg, folder, [])
    assert [p.name for p in sweep.points] == POINTS
    assert cfg.name.endswith("-quick") == quick
    runs = [sweep.run_config(p) for p in sweep.points]
    assert [r.model.heads.rank for r in runs] == [1, 2, 4, 8, 8]
    assert [r.model.loss.balance for r in runs] == ["switch"] * 4 + ["none"]
    # the same trunk, data, steps and seed everywhere: only the grid and the ablation differ
    same = {(r.model.gpt.d_model, r.model.gpt.n_layer, r.data.kind, r.trainer.max_steps, r.run.seed) for r in runs}
    assert len(same) == 1
    assert runs[0].data.kind == ("text" if "text" in preset else "code")


def _sweep_file(tmp_path, body: str) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(body)
    return str(path)


@pytest.mark.parametrize("body, message", [
    ("sweep:\n  gird: {model.heads.rank: [1, 2]}\n", "unknown sweep key 'gird' in"),
    ("sweep:\n  grid: {model.heads.rnak: [1, 2]}\n", "unknown config key 'model.heads.rnak' in sweep.grid"),
    ("sweep:\n  grid: {model.heads.rank: 2}\n", "must be a non-empty list"),
    ("sweep:\n  grid: {model.heads.rank: [1]}\n  extra_points: [{model.loss.balanse: none}]\n",
     "unknown config key 'model.loss.balanse' in sweep.extra_points[0]"),
    ("sweep:\n  grid: {model.heads.rank: [1]}\n  measure: {n_promts: 2}\n", "unknown sweep key 'measure.n_promts'"),
    ("run:\n  name: x\n", "is not a sweep file"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, capsys, body, message):
    assert main(["sweep", "--config", _sweep_file(tmp_path, body), f"sweep.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "sweep").exists()  # nothing is made before every point's config is checked


def test_grid_axis_cannot_be_overridden_for_every_point(tmp_path, capsys):
    assert main(["sweep", "--config", str(CONF / PRESETS[0]), "--quick", f"sweep.root={tmp_path}",
                 "model.heads.rank=3"]) == 2
    assert "model.heads.rank is a grid axis" in capsys.readouterr().err


def _point(name, rank, joint, nll, tau, tau_s, extra=False, balance=None, eff=None, dead=0):
    overrides = {"model.heads.rank": rank, **({"model.loss.balance": balance} if balance else {})}
    heldout = {"joint_nll_per_token": joint, "next_token_nll": nll, "effective_experts": eff or float(rank),
               "dead_experts": dead, "busiest_share": 1.0 / rank}
    decoding = {"mean_acceptance_length": tau, "sampled_mean_acceptance_length": tau_s}
    return {"name": name, "overrides": overrides, "extra": extra,
            "metrics": {"heldout": heldout, "decoding": decoding}}


def test_trend_rules():
    assert trend([3.0, 2.9, 2.8], -1, 0.02) == "confirmed"
    assert trend([3.0, 3.1, 2.8], -1, 0.02) == "mixed"
    assert trend([3.0, 2.99, 3.0], -1, 0.02) == "not confirmed"
    assert trend([1.2, 1.5], +1, 0.03) == "confirmed"
    assert trend([1.5], +1, 0.03) == "not tested"


def test_claims_on_hand_written_numbers():
    points = [_point("rank1", 1, 5.0, 4.00, 1.5, 1.3), _point("rank2", 2, 4.9, 4.01, 1.6, 1.4),
              _point("rank4", 4, 4.8, 4.02, 1.7, 1.3), _point("rank8", 8, 4.7, 4.03, 1.8, 1.2),
              _point("rank8_balance-none", 8, 4.9, 4.1, 1.5, 1.2, extra=True, balance="none", eff=1.4, dead=5)]
    claims = {c["claim"].split()[1]: c for c in judge_claims(points)}
    assert claims["joint"]["verdict"] == "confirmed"  # falls 5.0 -> 4.7, monotone
    assert claims["next-token"]["verdict"] == "confirmed"  # spread 0.03 <= 0.05
    assert claims["rises"]["verdict"] == "mixed"  # greedy rises, sampled does not
    assert claims["balancing"]["verdict"] == "confirmed"
    assert "effective experts 8.00 vs 1.40, dead experts 0 vs 5" in claims["balancing"]["evidence"]
    assert "r=1: 5.000, r=2: 4.900" in claims["joint"]["evidence"]
    # without the ablation, or with one grid point only, the claims say they were not tested
    claims = judge_claims(points[:1])
    assert [c["verdict"] for c in claims] == ["not tested"] * 4


def test_equal_time_reads_the_last_validation_within_the_budget():
    def p(name, s_per_step, values):
        curve = {"step": [10, 20, 30, 40], "value": values}
        m = {"step": 40, "s_per_step": s_per_step, "curves": {t: curve for t in (
            "val/next_token_nll", "val/joint_nll_per_token", "spec/mean_acceptance_length")}}
        return {"name": name, "overrides": {}, "extra": False, "metrics": m}

    et = equal_time([p("fast", 0.5, [4, 3, 2, 1]), p("slow", 1.0, [4, 2, 1, 0.5])], 0.0)
    assert et["budget_s"] == 20.0  # the fastest run's 40 steps
    fast, slow = et["rows"]
    assert fast["val/next_token_nll"] == 1 and slow["val/next_token_nll"] == 2
    assert slow["steps_in_budget"] == 20 and slow["val/next_token_nll@step"] == 20


def _sweep_quick(root, *extra) -> int:
    return main(["sweep", "--config", str(CONF / PRESETS[0]), "--quick", f"sweep.root={root}", *extra])


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    """The quick sweep, stopped by a SIGTERM at step 4 of rank4 (as a kill would), then run again."""
    from mtp_lightning.callbacks.safety import GracefulStopCallback

    root = tmp_path_factory.mktemp("sweeps")
    original = GracefulStopCallback.on_train_batch_end

    def sigterm_at_rank4_step4(self, trainer, *args):
        if Path(trainer.default_root_dir).name == "rank4" and trainer.global_step == 4:
            self.received = signal.SIGTERM
        return original(self, trainer, *args)

    with pytest.MonkeyPatch.context() as mp, capture() as first:
        mp.setattr(GracefulStopCallback, "on_train_batch_end", sigterm_at_rank4_step4)
        first.code = _sweep_quick(root)
    with capture() as second:
        second.code = _sweep_quick(root)
    return root / "rank_code-quick", first, second


class capture:
    """stdout and stderr of an in-process ``main`` call (capsys is function-scoped)."""

    def __enter__(self):
        self.out, self.err = io.StringIO(), io.StringIO()
        self._redirect = contextlib.redirect_stdout(self.out), contextlib.redirect_stderr(self.err)
        for r in self._redirect:
            r.__enter__()
        return self

    def __exit__(self, *exc):
        for r in reversed(self._redirect):
            r.__exit__(*exc)
        self.out, self.err = self.out.getvalue(), self.err.getvalue()


def test_quick_sweep_writes_runs_and_report(quick_sweep):
    quick_sweep, _, second = quick_sweep
    assert second.code == 0, second.err
    for name in POINTS:
        run = quick_sweep / name
        assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
        m = json.loads((run / "metrics.json").read_text())
        h = m["heldout"]
        assert m["step"] == 8 and m["other_corpus"]["source"] == "shakespeare"
        # bits per byte and the next-token NLL are one measurement: nats per token x tokens / bytes / ln 2
        assert h["bits_per_byte"] == pytest.approx(h["next_token_nll"] * h["heldout_positions"] / h["heldout_bytes"]
                                                   / math.log(2), rel=1e-5)
        assert set(m["machine"]) == {"cpu", "cpu_flags", "cores", "threads", "torch", "python",
                                     "load_average_1min", "gpu"}
        assert len(m["heldout"]["offset_nll"]) == 4 and len(m["decoding"]["sampled_per_position"]) == 3
        assert m["decoding"]["identical"] and m["s_per_step"] > 0 and m["train_tokens_per_s"] > 0
    for png in PLOTS:
        assert (quick_sweep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((quick_sweep / "report.json").read_text())
    assert [p["name"] for p in report["points"]] == POINTS and not report["missing"]
    assert sorted(report["plots"]) == sorted(PLOTS)
    assert [c["verdict"] in ("confirmed", "not confirmed", "mixed") for c in report["claims"]] == [True] * 4
    assert len(report["equal_time"]["rows"]) == 5 and report["equal_time"]["budget_s"] > 0
    md = (quick_sweep / "report.md").read_text()
    for section in ("## Held-out losses and throughput", "## Decoding and the mixture", "## The paper's claims",
                    "## Equal training time", "--quick"):
        assert section in md
    assert all(f"| {name} |" in md for name in POINTS)
    # each point's per-position acceptance, greedy and sampled, in its decoding row
    for name in POINTS:
        d = json.loads((quick_sweep / name / "metrics.json").read_text())["decoding"]
        cells = [" / ".join(f"{v:.3f}" for v in d[k]) for k in ("per_position", "sampled_per_position")]
        assert any(line.startswith(f"| {name} |") and all(f"| {c} |" in line for c in cells)
                   for line in md.splitlines()), name
    assert all(f"![{png}]({png})" in md for png in PLOTS)
    assert md.count("- **") == 4


def test_interrupted_sweep_resumes_and_skips_finished_points(quick_sweep):
    quick_sweep, first, second = quick_sweep
    assert first.code == 128 + signal.SIGTERM and "sweep stopped by signal" in first.err
    assert "rank2: trained" in first.out and "rank4: training" in first.out and "rank8" not in first.out
    assert second.out.count("finished, skipped") == 2 and "rank4: resuming from step 4" in second.out
    assert json.loads((quick_sweep / "rank4" / "metrics.json").read_text())["step"] == 8
    # a third run changes nothing: every point is finished
    stamps = {n: (quick_sweep / n / "metrics.json").stat().st_mtime_ns for n in POINTS}
    with capture() as third:
        assert _sweep_quick(quick_sweep.parent) == 0
    assert third.out.count("finished, skipped") == 5
    assert all((quick_sweep / n / "metrics.json").stat().st_mtime_ns == stamps[n] for n in POINTS)
    # a changed config is refused rather than mixed into the finished points
    with capture() as changed:
        assert _sweep_quick(quick_sweep.parent, "model.gpt.d_model=64") == 2
    assert "was run with another config (model.gpt.d_model" in changed.err


def test_load_sweep_rejects_a_run_config():
    with pytest.raises(UserError, match="not a sweep file"):
        load_sweep(str(CONF / "smoke.yaml"))
