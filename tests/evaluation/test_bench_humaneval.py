"""HumanEval: the unbiased pass@k estimator, program assembly, and canonical solutions in the sandbox."""

from __future__ import annotations

import gzip
import json
import math
import time

import pytest

from evaluation.benchmarks import BenchmarkFormatError, run_benchmark
from evaluation.benchmarks.humaneval import (
    build_program,
    evaluate_humaneval,
    load_humaneval,
    pass_at_k,
    truncate_completion,
)
from evaluation.benchmarks.sandbox import SandboxLimits

FIXTURE = "tests/fixtures/eval/humaneval_sample.jsonl"


def test_pass_at_k_worked_by_hand():
    """n=5, c=2: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10; pass@4 = 1 (n - c = 3 < 4)."""
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 4) == 1.0
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(200, 13, 10) == pytest.approx(1 - math.comb(187, 10) / math.comb(200, 10))
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_truncation_and_program_assembly():
    assert truncate_completion("    return 1\n\ndef extra():\n    pass\n") == "    return 1\n"
    assert truncate_completion("    x = 1\n    return x\n") == "    x = 1\n    return x\n"
    item = load_humaneval(FIXTURE)[0]
    program = build_program(item, "    return a + b\n")
    assert program.startswith(item.prompt + "    return a + b\n\ndef check(candidate):")
    assert program.endswith("check(add)\n")


def test_fixture_canonical_passes_and_wrong_completion_fails():
    items = load_humaneval(FIXTURE)
    completions = [[items[0].canonical_solution, "    return a - b\n"], [items[1].canonical_solution] * 2]
    result = evaluate_humaneval(items, completions=completions, n_samples=2, ks=(1, 2))
    assert [r["num_correct"] for r in result["records"]] == [1, 2]
    assert result["pass@1"] == pytest.approx((0.5 + 1.0) / 2)
    assert result["pass@2"] == pytest.approx(1.0)
    assert result["records"][0]["statuses"] == ["passed", "failed"]


def test_hostile_completions_fail_and_the_run_goes_on():
    items = load_humaneval(FIXTURE) * 3
    hostile = [
        "    while True:\n        pass\n",
        "    import posix\n    while True:\n        posix.fork()\n",
        "    open('/var/tmp/tidpo_humaneval_escape.txt', 'w').write('x')\n    return a + b\n",
        "    import socket\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n",
        "    x = bytearray(10**10)\n",
        "    return n % 2 == 0\n",
    ]
    limits = SandboxLimits(timeout_s=3.0, memory_bytes=256 << 20, max_processes=8)
    result = evaluate_humaneval(items, completions=[[c] for c in hostile], limits=limits)
    assert [r["statuses"][0] for r in result["records"]] == ["timeout"] + ["failed"] * 4 + ["passed"]
    assert result["num_timeouts"] == 1 and result["pass@1"] == pytest.approx(1 / 6)


def test_generate_is_called_once_per_sample_and_checked():
    calls = []

    def generate(prompts):
        calls.append(len(prompts))
        return ["    return a + b\n", "    return n % 2 == 0\n"]

    result = run_benchmark("humaneval", FIXTURE, generate=generate, n_samples=2, ks=(1,))
    assert calls == [2, 2] and result["pass@1"] == 1.0
    with pytest.raises(ValueError, match="every k"):
        evaluate_humaneval(load_humaneval(FIXTURE), generate, n_samples=1, ks=(2,))


def test_loader_reads_gzip_and_names_bad_lines(tmp_path):
    with open(FIXTURE) as handle:
        rows = [json.loads(line) for line in handle]
    good = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(good, "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    assert [item.task_id for item in load_humaneval(good)] == ["Fixture/0", "Fixture/1"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "test": None}) + "\n")
    with pytest.raises(BenchmarkFormatError, match=r"bad\.jsonl:2: field 'test'"):
        load_humaneval(bad)


@pytest.mark.slow
def test_real_canonical_solutions_all_pass(shared_data):
    items = load_humaneval(shared_data / "humaneval" / "HumanEval.jsonl.gz")
    start = time.perf_counter()
    result = evaluate_humaneval(items, completions=[[item.canonical_solution] for item in items], workers=2)
    elapsed = time.perf_counter() - start
    failures = [(r["task_id"], r["reasons"]) for r in result["records"] if r["num_correct"] == 0]
    assert len(items) == 164 and failures == [] and result["pass@1"] == 1.0
    assert elapsed < 60.0, f"took {elapsed:.1f} s"


def test_without_the_sandbox_humaneval_refuses_before_generating(tmp_path, monkeypatch):
    from evaluation.benchmarks import SandboxUnavailable

    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on PATH
    calls = []
    with pytest.raises(SandboxUnavailable, match=r"eval\.sandbox=unsafe-local"):
        run_benchmark("humaneval", FIXTURE, generate=lambda prompts: calls.append(prompts) or prompts)
    assert calls == []  # refused before any generation or execution


def test_the_sandbox_mode_and_flags_are_in_the_results():
    items = load_humaneval(FIXTURE)
    peek = "    import sys\n    sys._getframe()\n    return a + b\n"
    result = evaluate_humaneval(items, completions=[[peek], [items[1].canonical_solution]])
    assert result["sandbox"]["mode"] == "bwrap" and result["pass@1"] == 1.0
    assert result["records"][0]["flags"] == [["introspection:sys._getframe"]] and result["num_flagged"] == 1
    unsafe = evaluate_humaneval(items, completions=[[i.canonical_solution] for i in items], sandbox="unsafe-local")
    assert unsafe["sandbox"]["mode"] == "unsafe-local" and unsafe["pass@1"] == 1.0
