"""Red-team table: hostile programs against the HumanEval sandbox, per situation this machine allows.

    python benchmarks/bench_redteam.py            # prints the table, writes benchmarks/results/redteam.json

Situations: root + bubblewrap with the in-process guard, and with the kernel isolation alone; bubblewrap
missing; bubblewrap unable to create namespaces (a stand-in that fails like a default Docker container); an
unprivileged user ("nobody") with the guard, and alone, where that can be arranged. "known limit" counts the
documented HumanEval weakness (always-equal ``__eq__``), expected to get through. The same checks are asserted
by tests/evaluation/test_redteam.py.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.benchmarks import redteam, sandbox  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "redteam.json"


def _row(situation: str, outcomes: list, seconds: float) -> dict:
    known = [o for o in outcomes if o.known_limit and not o.contained]
    escaped = [o for o in outcomes if not o.contained and not o.known_limit]
    return {
        "situation": situation,
        "attacks": len(outcomes),
        "contained": sum(o.contained and o.status != "refused" for o in outcomes),
        "refused": sum(o.status == "refused" for o in outcomes),
        "known_limit": len(known),
        "escaped": len(escaped),
        "escapes": [f"{o.name}: {o.escaped}" for o in escaped + known],
        "seconds": round(seconds, 1),
        "outcomes": [o.__dict__ for o in outcomes],
    }


def _timed(fn):
    start = time.perf_counter()
    return fn(), time.perf_counter() - start


def _with_path(path: str, fn):
    before = os.environ["PATH"]
    os.environ["PATH"] = path
    try:
        return fn()
    finally:
        os.environ["PATH"] = before


def main() -> None:
    rows = []
    for guard in (True, False):
        outcomes, s = _timed(lambda g=guard: redteam.run_suite(sandbox, guard=g))
        rows.append(_row(f"{'root' if os.geteuid() == 0 else 'user'} + bwrap, {'guard' if guard else 'kernel only'}",
                         outcomes, s))  # fmt: skip
    with tempfile.TemporaryDirectory() as empty:
        outcomes, s = _timed(lambda: _with_path(empty, lambda: redteam.refused_suite(sandbox)))
        rows.append(_row("bwrap missing", outcomes, s))
        fake = Path(empty, "bwrap")
        fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
        fake.chmod(0o755)
        outcomes, s = _timed(lambda: _with_path(empty, lambda: redteam.refused_suite(sandbox)))
        rows.append(_row("bwrap cannot unshare (Docker-like)", outcomes, s))
    command = redteam.unprivileged_command()
    for guard in (True, False) if command else ():
        start = time.perf_counter()
        done = subprocess.run([*command, str(int(guard))], capture_output=True, text=True, cwd="/",
                              env={"PATH": "/usr/bin:/bin"}, check=True)  # fmt: skip
        result = json.loads(done.stdout)
        outcomes = [redteam.Outcome(**o) for o in result["outcomes"]]
        rows.append(_row(f"nobody + bwrap, {'guard' if guard else 'kernel only'}", outcomes,
                         time.perf_counter() - start))  # fmt: skip
    print(f"{'situation':<38} {'attacks':>7} {'contained':>9} {'refused':>7} {'known limit':>11} {'escaped':>7}")
    for r in rows:
        print(f"{r['situation']:<38} {r['attacks']:>7} {r['contained']:>9} {r['refused']:>7} "
              f"{r['known_limit']:>11} {r['escaped']:>7}")  # fmt: skip
        for line in r["escapes"]:
            print(f"    {line}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"machine": platform.platform(), "sandbox": sandbox.sandbox_info(), "rows": rows},
                              indent=1, default=list) + "\n")  # fmt: skip
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
