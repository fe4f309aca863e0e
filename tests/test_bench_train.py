"""``bench-train`` on a toy size: the table, the JSON, the targets' summary, what it refuses, and rows under
ddp and fsdp (one gloo process), bf16-mixed, and on a GPU where there is one."""

import argparse
import json
import math
import shlex

import pytest
import torch

from mtp_lightning.experiments.bench_train import add_arguments, build_specs, command_line, naive_bytes, run_specs
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
    # 3 products of 2 FLOP per (position, vocabulary, width) triple, B*T = 2*16 positions, V = 256, D = 16:
    # 786,432 FLOP per unembedding product; next-token rows have one product, CP n=2 r=2 four
    assert [row["floor_gflop"] for row in result["rows"]] == pytest.approx([0.000786432] * 2 + [0.003145728] * 2)
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


# ---- devices, precisions, strategies ------------------------------------------------------------------

ROW = {"batch": 2, "seq": 8, "layers": 1, "heads": 2, "d_model": 8, "warmup": 1, "steps": 1, "threads": 1,
       "vocab": 64, "n": 2, "r": 2, "kind": "lean"}


def test_rows_run_under_ddp_and_fsdp_in_a_one_process_gloo_group():
    specs = [{**ROW, "device": "cpu", "precision": "32-true", "strategy": "ddp"},
             {**ROW, "device": "cpu", "precision": "bf16-mixed", "strategy": "fsdp"}]
    rows = run_specs(specs, budget_gib=1.0, log=lambda s: None)
    for spec, row in zip(specs, rows):
        assert "skipped" not in row, row.get("skipped")
        assert row["strategy"] == spec["strategy"] and row["precision"] == spec["precision"]
        assert math.isfinite(row["step_s"]) and row["step_s"] > 0 and 0 < row["loss_s"] <= row["step_s"]
        assert row["step_peak_mib"] > 0 and row["peak_kind"] == "rss"
        assert row["matmul_dtype"] == "float32"  # the lean loss multiplies in float32 without bf16_unembed


def test_command_line_round_trips_the_new_options():
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--vocab", "64", "--nr", "2x2", "--device", "cuda", "--precision", "bf16-mixed",
                         "--strategy", "fsdp", "--bf16-unembed"])
    line = command_line(args)
    assert "--device cuda --precision bf16-mixed --strategy fsdp --bf16-unembed" in line
    prefix = "python -m mtp_lightning bench-train "
    assert line.startswith(prefix)
    again = p.parse_args(shlex.split(line[len(prefix):]))
    assert vars(again) == vars(args)
    defaults = p.parse_args([])
    assert command_line(defaults).endswith("--device cpu --precision 32-true --strategy none")
    assert build_specs(defaults)[0]["strategy"] == "none" and "bf16_unembed" not in build_specs(defaults)[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_row_counts_the_allocator_peak():
    (row,) = run_specs([{**ROW, "device": "cuda", "precision": "bf16-mixed", "strategy": "none",
                         "bf16_unembed": True}], budget_gib=1.0, log=lambda s: None)
    assert row["peak_kind"] == "cuda_max_allocated" and row["step_peak_mib"] > 0
    assert row["matmul_dtype"] == "bfloat16" and math.isfinite(row["step_s"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_train_refuses_cuda_without_a_gpu(capsys):
    assert main(["bench-train", "--device", "cuda"]) == 2
    assert "--device cuda but this machine has no CUDA GPU" in capsys.readouterr().err


def test_heads_only_rows_with_a_draft_vocabulary(tmp_path, capsys):
    out = tmp_path / "heads.json"
    assert main(["bench-train", *TOY, "--heads-only", "--draft-vocab", "100", "--json", str(out)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].endswith("| floor / loss time | step / floor |")
    assert "| 256 | CP n=2 r=2 V'=100 heads-only | lean |" in table[-1]
    result = json.loads(out.read_text())
    assert "--draft-vocab 100 --device cpu" in result["command"] and result["command"].endswith("--heads-only")
    rows = result["rows"]
    assert [(r["kind"], r.get("draft_vocab", 0), r["heads_only"]) for r in rows] == [("lean", 0, True), ("lean", 100, True)]
    assert [r["product_width"] for r in rows] == [256, 101]
    for row in rows:
        assert row["floor_gflop"] == 6 * 4 * 2 * 16 * row["product_width"] * 16 / 1e9
        assert math.isclose(row["step_over_floor"], row["step_s"] / row["floor_s"])
    assert main(["bench-train", *TOY, "--draft-vocab", "256"]) == 2
    assert "--draft-vocab 256 must be below every --vocab (256), or 0" in capsys.readouterr().err
