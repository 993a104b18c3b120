"""Benchmarks from local files in their published formats, offline and model-agnostic.

Each benchmark has ``load_<name>(path) -> list[item]`` and ``evaluate_<name>(items, generate|loglik, **opts)
-> dict`` with aggregate metrics and a ``records`` list (one dict per item, for reports).
:func:`run_benchmark` dispatches by name. The callables (see :mod:`.common`):

- ``GenerateFn``: ``list[str] -> list[str]``, prompt texts to completions (the caller templates and decodes);
- ``LoglikFn``: ``list[tuple[str, str]] -> list[float]``, summed log-probability of each continuation.

| name       | file                                     | needs    | metrics                                     |
| ---------- | ---------------------------------------- | -------- | ------------------------------------------- |
| ifeval     | ``input_data.jsonl``                     | generate | prompt/inst-level strict/loose accuracy     |
| humaneval  | ``HumanEval.jsonl.gz``                   | generate | pass@k (unbiased), sandboxed execution      |
| truthfulqa | ``TruthfulQA.csv``                       | loglik   | MC1, MC2                                    |
| gsm8k      | GSM8K ``*.jsonl``                        | generate | exact match of the final number             |
| mmlu       | ``*_test.csv`` file or folder            | loglik   | accuracy (micro, macro over subjects)       |

An lm-evaluation-harness backend is not included.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from evaluation.benchmarks.common import BenchmarkFormatError, GenerateFn, LoglikFn
from evaluation.benchmarks.gsm8k import evaluate_gsm8k, load_gsm8k
from evaluation.benchmarks.humaneval import evaluate_humaneval, load_humaneval, pass_at_k
from evaluation.benchmarks.ifeval import evaluate_ifeval, load_ifeval, score_ifeval
from evaluation.benchmarks.mmlu import evaluate_mmlu, load_mmlu
from evaluation.benchmarks.sandbox import SandboxLimits, SandboxUnavailable, run_program, sandbox_info
from evaluation.benchmarks.truthfulqa import evaluate_truthfulqa, load_truthfulqa

BENCHMARKS: dict[str, tuple[Callable[..., list], Callable[..., dict], str]] = {
    "ifeval": (load_ifeval, evaluate_ifeval, "generate"),
    "humaneval": (load_humaneval, evaluate_humaneval, "generate"),
    "truthfulqa": (load_truthfulqa, evaluate_truthfulqa, "loglik"),
    "gsm8k": (load_gsm8k, evaluate_gsm8k, "generate"),
    "mmlu": (load_mmlu, evaluate_mmlu, "loglik"),
}
"""Benchmark name -> (loader, evaluator, which callable it needs)."""


def run_benchmark(
    name: str,
    path: str | Path,
    *,
    generate: GenerateFn | None = None,
    loglik: LoglikFn | None = None,
    limit: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Load benchmark ``name`` from ``path`` and evaluate it with the callable it needs.

    ``limit`` keeps the first N items; ``options`` go to the evaluator (e.g. ``n_samples``/``ks`` for
    humaneval). The result also carries ``benchmark``, ``path`` and ``limit``.
    """
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    load, evaluate, needs = BENCHMARKS[name]
    model_fn = {"generate": generate, "loglik": loglik}[needs]
    if model_fn is None:
        raise ValueError(f"benchmark {name!r} needs a {needs} callable")
    result = evaluate(load(path), model_fn, limit=limit, **options)
    return {"benchmark": name, "path": str(path), "limit": limit, **result}


__all__ = [
    "BENCHMARKS",
    "BenchmarkFormatError",
    "GenerateFn",
    "LoglikFn",
    "SandboxLimits",
    "SandboxUnavailable",
    "evaluate_gsm8k",
    "evaluate_humaneval",
    "evaluate_ifeval",
    "evaluate_mmlu",
    "evaluate_truthfulqa",
    "load_gsm8k",
    "load_humaneval",
    "load_ifeval",
    "load_mmlu",
    "load_truthfulqa",
    "pass_at_k",
    "run_benchmark",
    "run_program",
    "sandbox_info",
    "score_ifeval",
]
