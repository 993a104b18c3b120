"""Red-team suite: every hostile program of ``evaluation.benchmarks.redteam`` is contained or refused.

Situations (``benchmarks/bench_redteam.py`` prints the same as a table):

- root with bubblewrap, guard on, and with the kernel isolation alone (``guard=False``);
- bubblewrap missing, and a bubblewrap that cannot create namespaces (a default Docker container): every
  attack is refused before it runs;
- an unprivileged user (``nobody``, under a system interpreter), kernel isolation alone, where it can be arranged.

The one expected escape is the documented HumanEval weakness (an always-equal ``__eq__``), asserted to escape so
that the documentation stays true.
"""

from __future__ import annotations

import json
import stat
import subprocess

import pytest

from evaluation.benchmarks import redteam, sandbox

pytestmark = pytest.mark.slow


def _assert_contained(outcomes: list) -> None:
    escaped = [(o.name, o.escaped) for o in outcomes if not o.contained and not o.known_limit]
    assert escaped == []
    for o in outcomes:
        if o.known_limit:
            assert not o.contained, f"{o.name} is contained now: update docs/SANDBOX.md and the attack"


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "kernel-only"])
def test_every_attack_is_contained_under_bubblewrap(guard):
    outcomes = redteam.run_suite(sandbox, guard=guard)
    assert len(outcomes) == sum(1 for a in redteam.ATTACKS if guard or a.kernel) >= (30 if guard else 25)
    _assert_contained(outcomes)
    if guard:  # the guard stopped the process and network attacks in-process, and said so
        fork = next(o for o in outcomes if o.name == "fork bomb")
        assert fork.reason == "PermissionError: sandbox: os.fork refused"


def test_without_bubblewrap_every_attack_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    outcomes = redteam.refused_suite(sandbox)
    assert {o.status for o in outcomes} == {"refused"} and len(outcomes) == len(redteam.ATTACKS)
    assert "bwrap not found" in outcomes[0].reason and "eval.sandbox=unsafe-local" in outcomes[0].reason


def test_where_namespaces_are_not_allowed_every_attack_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path))
    outcomes = redteam.refused_suite(sandbox)
    assert {o.status for o in outcomes} == {"refused"}
    assert "No permissions to creating new namespace" in outcomes[0].reason


def test_as_an_unprivileged_user_every_attack_is_contained():
    command = redteam.unprivileged_command()
    if command is None:
        pytest.skip("needs root, setpriv and an interpreter that 'nobody' can execute")
    done = subprocess.run([*command, "0"], capture_output=True, text=True, cwd="/", env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    if result["situation"] != "ran":  # no unprivileged user namespaces here: refusing is the right outcome
        assert {o["status"] for o in result["outcomes"]} == {"refused"}
        pytest.skip(f"bubblewrap refuses for an unprivileged user here: {result['situation']}")
    outcomes = [redteam.Outcome(**o) for o in result["outcomes"]]
    assert len(outcomes) >= 25
    _assert_contained(outcomes)
