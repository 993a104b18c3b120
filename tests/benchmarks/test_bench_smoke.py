"""Seconds-long smoke runs of the training benchmarks at toy sizes: they run and write the documented keys."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_step_smoke(tmp_path: Path) -> None:
    out = tmp_path / "train_step.json"
    args = ["--sizes", "micro", "--repeats", "2", "--warmup", "0", "--steps", "1", "--out", str(out)]
    _load("bench_train_step").main(args)
    data = json.loads(out.read_text())
    assert {"machine", "goals_vs_dpo", "sizes"} <= data.keys()
    assert {"load_avg_start", "load_avg_end", "torch_threads", "cpus", "torch"} <= data["machine"].keys()
    res = data["sizes"]["micro"]
    assert set(res["step_cpu_seconds"]) == {"dpo", "weights", "full", "weights_separate"}
    assert set(res["ratio_vs_dpo"]) == {"weights", "full", "weights_separate"}
    assert {"median", "iqr", "q1", "q3"} <= res["ratio_vs_dpo"]["weights"].keys()
    assert set(res["goal_met"]) == {"weights", "full"}
    # the shared and the separate attribution pass give the same loss (dropout is off)
    assert res["first_loss"]["weights"] == pytest.approx(res["first_loss"]["weights_separate"], rel=1e-5)


def test_bench_token_logps_smoke(tmp_path: Path) -> None:
    out = tmp_path / "token_logps.json"
    args = ["--batch", "2", "--tokens", "8", "--vocab", "512", "--repeats", "1", "--modes", "fwdbwd"]
    _load("bench_token_logps").main([*args, "--layouts", "sliced", "--out", str(out)])
    data = json.loads(out.read_text())
    assert {"shape", "machine", "results", "chunked_vs_naive", "max_abs_diff_chunked_vs_naive"} <= data.keys()
    assert {r["impl"] for r in data["results"]} == {"chunked", "naive"}
    assert {"extra_peak_mib", "median_cpu_s"} <= data["results"][0].keys()
    assert data["max_abs_diff_chunked_vs_naive"] < 1e-3


def test_bench_autocast_smoke(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    out = tmp_path / "autocast.json"
    _load("bench_autocast").main(["--model", "tiny", "--pairs", "2", "--repeats", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    assert set(data["step_seconds"]) == {"fp32", "bf16"} and all(len(v) == 2 for v in data["step_seconds"].values())
    # speedup = fp32 / bf16 per repeat (from the unrounded times; the recorded ones are rounded to 1 ms)
    ratios = [f / b for f, b in zip(data["step_seconds"]["fp32"], data["step_seconds"]["bf16"])]
    assert data["speedup_range"] == [pytest.approx(min(ratios), rel=0.03), pytest.approx(max(ratios), rel=0.03)]
    gap = data["accuracy"]["token_logp_abs_gap"]
    assert 0 < gap["mean"] <= gap["max"] < 0.5  # bf16 rounding: nonzero, small
    assert "cpu_bf16_flags" in data["machine"]
