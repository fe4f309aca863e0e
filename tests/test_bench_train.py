"""``bench-train`` on a toy size: the table, the JSON, the targets' summary, and what it refuses."""

import json

from mtp_lightning.bench_train import naive_bytes, run_specs
from mtp_lightning.cli import main

TOY = ["--vocab", "256", "--nr", "2x2", "--batch", "2", "--seq", "16", "--layers", "1", "--d-model", "16",
       "--threads", "1"]


def test_bench_train_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench" / "train.json"
    assert main(["bench-train", *TOY, "--json", str(out)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| vocab | model | loss | step s | tokens/s")
    assert len(table) == 2 + 4  # header, rule, next-token (full logits, lean), CP naive and lean
    assert "| 256 | CP n=2 r=2 | lean |" in table[-1]
    result = json.loads(out.read_text())
    assert set(result["machine"]) >= {"cpu", "cores", "torch", "threads"}
    assert result["command"].startswith("python -m mtp_lightning bench-train --vocab 256 --nr 2x2")
    kinds = [(r["kind"], r["n"], r["r"]) for r in result["rows"]]
    assert kinds == [("ntp", 1, 1), ("ntp-lean", 1, 1), ("naive", 2, 2), ("lean", 2, 2)]
    for row in result["rows"]:
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and 0 < row["loss_s"] <= row["step_s"]
        assert row["peak_rss_mib"] > row["step_peak_mib"] > 0
        assert row["floor_gflop"] == 6 * row["products"] * 2 * 16 * 256 * 16 / 1e9
    targets = result["targets"]
    assert [(m["loss"], m["n"], m["r"]) for m in targets["memory_vs_ntp"]] == [("naive", 2, 2), ("lean", 2, 2)]
    (speed,) = targets["lean_vs_naive"]
    assert speed["lean_le_naive"] == (speed["lean_s"] <= speed["naive_s"])


def test_naive_rows_over_the_memory_budget_are_skipped_not_run():
    spec = {"batch": 16, "seq": 256, "vocab": 32768, "n": 4, "r": 8, "kind": "naive"}
    assert naive_bytes(spec) == 4 * 4096 * 32768 * (32 + 16)  # 24 GiB: more than this machine has
    (row,) = run_specs([spec], budget_gib=8.0, log=lambda s: None)
    assert "would hold ~24.0 GiB" in row["skipped"]


def test_bench_train_refuses_bad_settings(capsys):
    assert main(["bench-train", "--nr", "4by8"]) == 2
    assert "--nr '4by8' is not of the form NxR" in capsys.readouterr().err
