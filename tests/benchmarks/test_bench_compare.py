"""``benchmarks/bench_compare.py``: the aggregation by hand, and one real comparison of two variants."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_compare.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_compare", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_aggregate_mean_std_and_table_by_hand():
    bench = _bench()
    acc = "eval/rewards/accuracies"
    tables = {
        0: [{"variant": "dpo", acc: 0.5, "train_step_time_s": 2.0}, {"variant": "paper", acc: 0.7}],
        1: [{"variant": "dpo", acc: 0.6, "train_step_time_s": 4.0}, {"variant": "paper", acc: 0.9}],
    }
    agg = bench.aggregate(tables)
    assert agg["paper"][acc]["mean"] == pytest.approx(0.8)
    assert agg["paper"][acc]["std"] == pytest.approx(math.sqrt(((0.7 - 0.8) ** 2 + (0.9 - 0.8) ** 2) / 1))
    step = agg["dpo"]["train_step_time_s"]
    assert step == {"values": {"0": 2.0, "1": 4.0}, "mean": 3.0, "std": pytest.approx(2**0.5)}
    assert "train_step_time_s" not in agg["paper"]  # never measured: absent, not zero
    table = bench.markdown({"variants": agg, "seeds": [0, 1]}).splitlines()
    assert table[0] == "| variant | rewards/accuracies | train_step_time_s |"
    assert table[3] == "| paper | 0.800 ± 0.141 |  |"


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.deepspeed
@pytest.mark.expensive  # two full `tidpo run` loops (~200 s on CI); the loop itself runs in test_two_node.py
def test_compare_two_variants_on_the_tiny_loop(ray_cluster, tmp_path):
    """dpo and paper from the same prepared data and start model, one seed: every row has its metrics, dpo's step
    time ratio is 1 by definition, each variant trained with its own preset and the start was evaluated once."""
    bench = _bench()
    out = tmp_path / "compare.json"
    overrides = [
        "data.synthetic_num_pairs=48",
        "train.sft_steps=0",
        "train.max_steps=2",
        "train.num_workers=1",
        "train.save_every=0",
        "loop.rounds=1",
        "eval.num_prompts=4",
        "eval.num_samples=1",
        "eval.weight_diag_pairs=2",
        "eval.heatmap_pairs=1",
        "generation.max_new_tokens=8",
        "tracking.enabled=false",
    ]
    args = ["configs/tiny.yaml", *overrides, "--variants", "dpo", "paper", "--out", str(out)]
    result = bench.main([*args, "--work", str(tmp_path / "work"), "--plot", str(tmp_path / "c.png")])
    assert json.loads(out.read_text())["variants"] == result["variants"]
    rows = result["tables"]["0"]
    assert [r["variant"] for r in rows] == ["start", "dpo", "paper"]
    for row in rows:
        assert 0.0 <= row["eval/rewards/accuracies"] <= 1.0
    dpo, paper = rows[1], rows[2]
    assert dpo["step_time_ratio_to_dpo"] == 1.0
    assert paper["step_time_ratio_to_dpo"] == pytest.approx(paper["train_step_time_s"] / dpo["train_step_time_s"])
    work = tmp_path / "work" / "seed-0"
    for name, weighting in (("dpo", "uniform"), ("paper", "attribution")):
        summary = json.loads((work / "compare" / name / "rounds" / "round-1" / "summary.json").read_text())
        assert summary["config"]["loss"]["weighting"] == weighting and summary["steps"] == 2
        assert summary["final"] == {}  # no held-out pass in the worker: the loop's evaluate() measures the round
        assert (work / "compare" / name / "data").resolve() == (work / "data").resolve()  # the same prepared data
    assert (work / "eval" / "round-0").is_dir()  # the start, evaluated once for all variants
    assert not (work / "compare" / "dpo" / "eval" / "round-0").exists()
    assert (tmp_path / "c.png").stat().st_size > 1000 and out.with_suffix(".md").exists()
