"""Time the offline benchmark harnesses on the real files (``python benchmarks/bench_eval.py [DATA_DIR]``).

Measures: IFEval scoring of all 541 prompts with a trivial generate (echo the prompt), HumanEval's 164
canonical solutions through the sandbox (pass@1 must be 1.0), and TruthfulQA's 817 questions with a
length-based log-likelihood. Prints one JSON line per benchmark.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from evaluation.benchmarks import run_benchmark, sandbox_info
from evaluation.benchmarks.humaneval import evaluate_humaneval, load_humaneval


def _timed(name: str, fn) -> None:
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    numbers = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print(json.dumps({"benchmark": name, "seconds": round(seconds, 2), **numbers}))


def main(data: Path) -> None:
    """Run the three timings on ``data`` (the ``shared/data`` folder)."""
    print(json.dumps({"sandbox": sandbox_info()}))
    _timed("ifeval", lambda: run_benchmark("ifeval", data / "ifeval/input_data.jsonl", generate=list))
    items = load_humaneval(data / "humaneval/HumanEval.jsonl.gz")
    canonical = [[item.canonical_solution] for item in items]
    _timed("humaneval-canonical", lambda: evaluate_humaneval(items, completions=canonical, workers=2))

    def length_loglik(requests):
        return [-float(len(continuation)) for _, continuation in requests]

    _timed("truthfulqa", lambda: run_benchmark("truthfulqa", data / "truthfulqa/TruthfulQA.csv", loglik=length_loglik))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "data")
