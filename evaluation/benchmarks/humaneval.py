"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code") with pass@k.

Data: ``HumanEval.jsonl.gz`` rows with ``task_id``, ``prompt``, ``entry_point``, ``canonical_solution`` and
``test``. A sample is the completion of the prompt; the program run is, as in openai/human-eval,
``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"``, executed in :mod:`sandbox` (untrusted
code: a bubblewrap sandbox by default; ``sandbox="unsafe-local"`` is the explicit opt-out, and without
bubblewrap evaluation refuses). A sample passes when that program runs to completion. The results carry the
sandbox mode, per-sample guard ``flags`` (frame introspection, refused operations) and ``num_flagged``.
A known weakness of HumanEval itself remains: a completion returning an object whose ``__eq__`` is always
true passes ``assert candidate(x) == y`` checks.

pass@k (unbiased estimator, Chen et al. 2021 eq. 1) for a problem with ``n`` samples of which ``c`` pass:
``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` (no large binomials);
the reported value is its mean over problems. An lm-evaluation-harness backend is not included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.benchmarks.common import (
    BenchmarkFormatError,
    GenerateFn,
    apply_limit,
    call_generate,
    iter_jsonl,
    mean,
    require_fields,
)
from evaluation.benchmarks.sandbox import SandboxLimits, run_programs, sandbox_info

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n@")
"""Codex-paper stop sequences: a completion is cut at the first top-level statement after the function."""


@dataclass(frozen=True)
class HumanEvalItem:
    """One HumanEval problem."""

    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str


def load_humaneval(path: str | Path) -> list[HumanEvalItem]:
    """Read ``HumanEval.jsonl(.gz)``; missing or mistyped fields raise with file and line."""
    names = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
    items = []
    for lineno, row in iter_jsonl(path):
        require_fields(row, dict.fromkeys(names, str), f"{path}:{lineno}")
        items.append(HumanEvalItem(*(row[name] for name in names)))
    if not items:
        raise BenchmarkFormatError(f"{path}: no problems")
    return items


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k: probability that at least one of k samples drawn from n (c correct) is correct.

    ``1 - C(n-c, k)/C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)``; exactly 1.0 when ``n - c < k``.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def truncate_completion(completion: str, stop_sequences: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """``completion`` cut before the earliest stop sequence (unchanged when none occurs)."""
    cut = min((i for i in (completion.find(s) for s in stop_sequences) if i >= 0), default=len(completion))
    return completion[:cut]


def build_program(item: HumanEvalItem, completion: str) -> str:
    """The program run for one sample: prompt, completion, the tests and the call of ``check``."""
    return f"{item.prompt}{completion}\n{item.test}\ncheck({item.entry_point})\n"


def _samples(
    items: list[HumanEvalItem], generate: GenerateFn | None, completions: list[list[str]] | None, n: int
) -> list[list[str]]:
    """``n`` completions per item, from ``generate`` (called n times) or given directly."""
    if (generate is None) == (completions is None):
        raise ValueError("pass exactly one of generate or completions")
    if completions is not None:
        if len(completions) != len(items) or any(len(c) != n for c in completions):
            raise ValueError(f"completions must be {len(items)} lists of n_samples={n} strings")
        return [list(c) for c in completions]
    rounds = [call_generate(generate, [item.prompt for item in items]) for _ in range(n)]
    return [[rounds[r][i] for r in range(n)] for i in range(len(items))]


def evaluate_humaneval(
    items: list[HumanEvalItem],
    generate: GenerateFn | None = None,
    *,
    completions: list[list[str]] | None = None,
    n_samples: int = 1,
    ks: tuple[int, ...] = (1,),
    stop_sequences: tuple[str, ...] = STOP_SEQUENCES,
    limits: SandboxLimits | None = None,
    workers: int = 2,
    limit: int | None = None,
    sandbox: str = "bwrap",
) -> dict[str, Any]:
    """pass@k over problems and per-problem records (completions, statuses, failure reasons).

    Args:
        generate: prompts -> completions; called ``n_samples`` times (it must sample when n_samples > 1).
        completions: instead of ``generate``, ``len(items)`` lists of ``n_samples`` completions.
        ks: the k of each reported ``pass@k``; each must be <= n_samples.
        stop_sequences: completions are truncated at the first of these (``()`` keeps them whole).
        limits, workers: sandbox limits (default :class:`SandboxLimits`) and programs run at once.
        sandbox: ``"bwrap"`` (isolation; raises :class:`SandboxUnavailable` where it cannot be had) or
            ``"unsafe-local"`` (the host user, rlimits and the in-process guard only).
    """
    info = sandbox_info(sandbox)  # refuse before generating anything
    items = apply_limit(items, limit)
    if completions is not None and limit is not None:
        completions = completions[: len(items)]
    if any(k > n_samples for k in ks):
        raise ValueError(f"every k in {ks} must be <= n_samples={n_samples}")
    raw = _samples(items, generate, completions, n_samples)
    samples = [[truncate_completion(c, stop_sequences) for c in row] for row in raw]
    programs = [build_program(item, c) for item, row in zip(items, samples) for c in row]
    results = run_programs(programs, limits or SandboxLimits(), workers=workers, mode=sandbox)
    records = []
    for i, item in enumerate(items):
        own = results[i * n_samples : (i + 1) * n_samples]
        passed = sum(r.passed for r in own)
        records.append({
            "task_id": item.task_id,
            "completions": samples[i],
            "statuses": [r.status for r in own],
            "reasons": [r.reason for r in own],
            "flags": [list(r.flags) for r in own],
            "num_correct": passed,
            **{f"pass@{k}": pass_at_k(n_samples, passed, k) for k in ks},
        })  # fmt: skip
    summary = {f"pass@{k}": mean([rec[f"pass@{k}"] for rec in records]) for k in ks}
    statuses = [r.status for r in results]
    return {
        **summary,
        "num_problems": len(records),
        "n_samples": n_samples,
        "num_timeouts": statuses.count("timeout"),
        "num_flagged": sum(bool(r.flags) for r in results),
        "sandbox": info,
        "records": records,
    }
