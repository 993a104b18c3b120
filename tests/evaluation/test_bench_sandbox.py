"""The sandbox for untrusted code: bubblewrap isolation, fail-closed refusal, verdicts, reasons, the guard.

The red-team suite (``test_redteam.py``) runs every hostile program of ``evaluation.benchmarks.redteam``;
these tests pin the single behaviours, each both with the in-process guard and (``guard=False``) with the
kernel isolation alone where that is what must hold.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from evaluation.benchmarks import redteam, redteam_attacks, sandbox
from evaluation.benchmarks.sandbox import (
    SandboxLimits,
    SandboxUnavailable,
    run_program,
    run_programs,
    sandbox_info,
    sanitize_reason,
)

# Generous enough for a loaded 2-core machine; the tests with an endless loop pay the timeout once each.
FAST = SandboxLimits(timeout_s=3.0, memory_bytes=256 << 20, max_processes=8, max_file_bytes=1 << 20)
BOTH = pytest.mark.parametrize("guard", [True, False], ids=["guard", "kernel-only"])


@pytest.fixture(autouse=True)
def _needs_bwrap():
    try:
        sandbox_info("bwrap")
    except SandboxUnavailable as exc:
        pytest.fail(f"these tests need bubblewrap (scripts/install.sh installs it): {exc}")


def test_good_program_passes_and_bad_one_fails():
    ok = run_program("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('hello')\n", FAST)
    assert ok.passed and ok.returncode == 0 and ok.stdout_tail.strip() == "hello"
    bad = run_program("assert 1 == 2\n", FAST)
    assert bad.status == "failed" and bad.reason == "AssertionError"


@pytest.mark.parametrize("source", ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"])
def test_exiting_early_with_status_zero_is_not_a_pass(source):
    assert run_program(source, FAST).status == "failed"


def test_infinite_loop_times_out_and_is_killed():
    result = run_program("while True:\n    pass\n", FAST)
    assert result.status == "timeout" and result.returncode == -9
    assert result.wall_s < FAST.timeout_s + 3.0
    assert redteam.leftover_processes(sandbox) == []


def test_the_root_holds_only_the_interpreter_and_the_program():
    """No /etc beyond the loader cache, no /proc, no home, no project; the program alone in a read-only folder."""
    here = str(Path(__file__).resolve())
    source = (
        "import os, sys\nprint(sorted(os.listdir('/')))\nprint(sorted(os.listdir('.')))\n"
        f"print(os.path.exists('/proc/self'), os.path.exists('/etc/passwd'), os.path.exists({here!r}))\n"
        "print(sorted(os.listdir('/etc')))\nprint(any('site-packages' in p and os.listdir(p) for p in sys.path))\n"
    )
    result = run_program(source, FAST)
    assert result.passed, result
    lines = result.stdout_tail.splitlines()
    assert set(eval(lines[0])) <= {"dev", "etc", "lib", "lib64", "root", "sandbox", "tmp", "usr"}
    assert eval(lines[1]) == ["program.py"]
    assert lines[2] == "False False False"
    assert eval(lines[3]) in ([], ["ld.so.cache"])
    assert lines[4] == "False"


@pytest.mark.skipif(os.geteuid() != 0, reason="a fresh uid per program needs a root host")
def test_each_program_runs_as_a_fresh_uid_without_privileges():
    source = (
        "import os\nprint(os.getuid(), os.geteuid(), os.getgroups())\n"
        "for call in (lambda: os.setuid(0), lambda: os.chroot('/'), lambda: os.setgroups([0])):\n"
        "    try:\n        call()\n        print('ESCALATED')\n    except PermissionError:\n        pass\n"
    )
    uids = []
    for result in run_programs([source, source], FAST, workers=1):
        assert result.passed and "ESCALATED" not in result.stdout_tail
        uid, euid, groups = result.stdout_tail.split(" ", 2)
        assert uid == euid and groups.strip() == "[]"
        uids.append(int(uid))
    assert uids[0] != uids[1] and all(sandbox.UID_BASE <= u < sandbox.UID_BASE + 1_000_000 for u in uids)


@BOTH
def test_fork_bomb_hits_the_process_limit_and_leaves_nothing(guard):
    source = "import posix, time\nwhile True:\n    if posix.fork() == 0:\n        time.sleep(60)\n"
    result = run_program(source, FAST, guard=guard)
    expected = "os.fork refused" if guard else "Resource temporarily unavailable"
    assert result.status == "failed" and expected in result.reason
    assert redteam.leftover_processes(sandbox) == []  # the sleeping children died with the PID namespace


def test_a_setsid_daemon_dies_with_its_run():
    source = "import posix, time\nif posix.fork() == 0:\n    posix.setsid()\n    time.sleep(60)\n"
    result = run_program(source, FAST, guard=False)
    assert result.passed  # the parent ran to completion; its daemon must not outlive it
    assert redteam.leftover_processes(sandbox) == []


def test_unbounded_allocation_fails_with_memory_error():
    result = run_program("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", FAST)
    assert result.status in ("failed", "timeout")  # filling 256 MiB can outlast the timeout on a busy host
    assert result.reason in ("MemoryError", "wall-clock time limit exceeded")
    result = run_program("x = bytearray(10**10)\n", FAST)  # 10 GB at once: refused by RLIMIT_AS
    assert result.status == "failed" and result.reason == "MemoryError"


def test_unbounded_output_is_capped_by_the_file_size_limit():
    result = run_program("while True:\n    print('x' * 10000)\n", FAST)
    assert result.status == "failed" and "File too large" in result.reason


@BOTH
@pytest.mark.parametrize(
    "template",
    [
        "open({path!r}, 'w').write('escaped')\n",
        "import posix\nposix.close(posix.open({path!r}, posix.O_WRONLY | posix.O_CREAT))\n",
        "import _io\n_io.open({path!r}, 'w').write('escaped')\n",
    ],
    ids=["open", "posix.open", "_io.open"],
)
def test_writing_to_a_host_folder_fails(tmp_path, template, guard):
    os.chmod(tmp_path, 0o1777)  # even a world-writable host folder is out of reach
    target = tmp_path / "escaped.txt"
    result = run_program(template.format(path=str(target)), FAST, guard=guard)
    assert result.status == "failed" and not target.exists()


@BOTH
def test_tmp_and_dev_shm_are_private_capped_and_gone_after_the_run(guard):
    name = f"tidpo-sandbox-test-{os.getpid()}"
    source = (
        f"import posix\nfor path in ['/tmp/{name}', '/dev/shm/{name}']:\n"
        "    fd = posix.open(path, posix.O_WRONLY | posix.O_CREAT)\n    try:\n"
        "        for _ in range(8):\n            posix.write(fd, b'x' * (1 << 20))\n"
        "    except OSError as exc:\n        print(exc.strerror)\n"
    )
    limits = SandboxLimits(timeout_s=3.0, memory_bytes=256 << 20, tmpfs_bytes=4 << 20, max_file_bytes=64 << 20)
    result = run_program(source, limits, guard=guard)
    assert result.passed and result.stdout_tail.split() == ["No", "space", "left", "on", "device"] * 2
    assert not Path("/tmp", name).exists() and not Path("/dev/shm", name).exists()


@BOTH
def test_the_program_and_its_folder_are_read_only(guard):
    source = "import posix\nposix.close(posix.open('program.py', posix.O_WRONLY | posix.O_TRUNC))\n"
    assert run_program(source, FAST, guard=guard).status == "failed"
    assert run_program("open('scratch.txt', 'w')\n", FAST, guard=guard).status == "failed"
    assert run_program("open('/tmp/scratch.txt', 'w').write('ok')\n", FAST, guard=guard).passed


@BOTH
def test_opening_a_socket_reaches_nothing(guard):
    bait = redteam.Bait()
    try:
        template = "import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n"
        result = run_program(template.format(port=bait.port), FAST, guard=guard)
        assert result.status == "failed" and redteam_attacks.no_connection(result, bait) is None
    finally:
        bait.close()


def test_environment_is_empty_of_the_users_variables(monkeypatch):
    monkeypatch.setenv("TIDPO_SANDBOX_SECRET", "do-not-leak")
    assert run_program("import os\nassert dict(os.environ) == {}, dict(os.environ)\n", FAST).passed


@BOTH
def test_signalling_host_processes_fails(guard):
    bait = redteam.Bait()
    try:
        for source in (f"import posix\nposix.kill({bait.victim.pid}, 9)\n", "import posix\nposix.kill(-1, 9)\n"):
            assert run_program(source, FAST, guard=guard).status == "failed"
        assert bait.victim.poll() is None  # and this test process is alive to assert it
    finally:
        bait.close()


def test_the_run_goes_on_after_hostile_programs():
    sources = ["while True:\n    pass\n", "assert True\n", "import os\nos.fork()\n", "print(sum(range(10)))\n"]
    statuses = [r.status for r in run_programs(sources, FAST, workers=2)]
    assert statuses == ["timeout", "passed", "failed", "passed"]


# ----------------------------------------------------------------------------------------------------------
# Verdicts and reasons.


def test_the_program_cannot_reach_the_boot_frames_or_the_token():
    source = "import sys\nf = sys._getframe()\nprint(f.f_back is None, f.f_code.co_filename)\n"
    result = run_program(source, FAST)
    assert result.passed and result.stdout_tail.strip() == "True program.py"
    for refused, flag in (
        ("import gc\ngc.get_objects()\n", "refused:gc.get_objects"),
        ("import sys\nsys._current_frames()\n", "refused:sys._current_frames"),
        ("import ctypes\n", "refused:import:ctypes"),
        ("import sys\nsys.settrace(lambda *a: None)\n", "refused:sys.settrace"),
    ):
        result = run_program(refused, FAST)
        assert result.status == "failed" and "refused" in result.reason and result.flags == (flag,)


def test_frame_introspection_by_the_program_is_flagged_not_the_stdlibs():
    flagged = run_program("import sys\nsys._getframe()\ntry:\n    1 / 0\nexcept Exception as e:\n"
                          "    e.__traceback__.tb_frame\n", FAST)  # fmt: skip
    assert flagged.passed and flagged.flags == ("introspection:sys._getframe", "introspection:tb_frame")
    clean = run_program("import collections, typing\nP = collections.namedtuple('P', 'a')\nT = typing.TypeVar('T')\n")
    assert clean.passed and clean.flags == ()


def test_a_refused_operation_that_the_program_catches_is_flagged():
    source = "try:\n    import socket\nexcept PermissionError:\n    pass\n"
    result = run_program(source, FAST)
    assert result.passed and result.flags == ("refused:import:socket",)


def test_failure_reasons_are_an_exception_type_and_a_short_clean_message():
    result = run_program("raise ValueError('x\\x1b[31m' * 500)\n", FAST)
    assert result.reason.startswith("ValueError: x [31mx") and len(result.reason) <= 200
    assert result.reason.isprintable()
    # Output that is not a traceback never becomes a reason.
    result = run_program("import sys\nsys.stderr.write('root:x:0:0:root:/root:/bin/bash\\n')\nsys.exit(3)\n", FAST)
    assert result.reason == "exit status 1 without completing"
    assert sanitize_reason("root:x:0:0:root:/root:/bin/bash") == ""
    assert sanitize_reason("KeyError: 'k'") == "KeyError: 'k'"


# ----------------------------------------------------------------------------------------------------------
# Fail closed.


def test_without_bubblewrap_running_code_is_refused_naming_the_opt_in(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no bwrap on it
    with pytest.raises(SandboxUnavailable) as info:
        run_program("print('ran')\n", FAST)
    message = str(info.value)
    assert "\n" not in message and "bwrap not found" in message and "eval.sandbox=unsafe-local" in message
    with pytest.raises(SandboxUnavailable):
        run_programs(["print('ran')\n"], FAST)


def test_a_bubblewrap_that_cannot_create_namespaces_is_refused(tmp_path, monkeypatch):
    """A default Docker container: bwrap is there but may not unshare."""
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: Creating new namespace failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match="Creating new namespace failed.*eval.sandbox=unsafe-local"):
        run_program("print('ran')\n", FAST)


def test_unsafe_local_is_explicit_and_labelled():
    assert sandbox_info("unsafe-local")["mode"] == "unsafe-local"
    assert sandbox_info("bwrap")["mode"] == "bwrap"
    assert run_program("assert 1 + 1 == 2\n", FAST, mode="unsafe-local").passed
    with pytest.raises(ValueError, match="not one of"):
        sandbox_info("auto")
