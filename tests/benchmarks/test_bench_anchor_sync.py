"""Smoke run of bench_anchor_sync.py on the tiny model (three `tidpo train` runs: minutes, so expensive)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_anchor_sync.py"

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.expensive]


def test_bench_anchor_sync_smoke(tmp_path: Path, ray_cluster) -> None:
    spec = importlib.util.spec_from_file_location("bench_anchor_sync", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "anchor_sync.json"
    module.main(["--models", "tiny", "--steps", "3", "--out", str(out)])
    data = json.loads(out.read_text())
    tiny = data["models"]["tiny"]
    assert {"column", "online", "steps", "ratio_vs_column", "goal_met"} <= tiny.keys()
    assert all(tiny[m]["steps"] == 3 and tiny[m]["step_time_s"] > 0 for m in ("column", "online", "steps"))
    assert tiny["steps"]["staleness_max"] <= 1 and tiny["steps"]["wait_s"] >= 0
    assert tiny["ratio_vs_column"]["steps"] == pytest.approx(
        tiny["steps"]["step_time_s"] / tiny["column"]["step_time_s"], abs=1e-3
    )
