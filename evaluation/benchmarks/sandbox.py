"""Run untrusted Python programs (e.g. model-written HumanEval code) in a bubblewrap sandbox.

Mode ``bwrap`` (the default; ``eval.sandbox``) runs each program under bubblewrap (``bwrap``, Debian package
``bubblewrap``) with:

- a mount namespace whose root is an empty tmpfs holding, read-only, only the interpreter, its shared
  libraries and its standard library (``site-packages`` and ``dist-packages`` hidden behind empty tmpfs), and
  the run's folder (``program.py`` alone) at ``/sandbox``, also read-only. No ``/proc``, no ``/etc``, no
  ``/root``, nothing of the project or of any other run. ``/tmp`` and ``/dev/shm`` are private tmpfs capped at
  :attr:`SandboxLimits.tmpfs_bytes` each and vanish with the run; ``/dev`` holds only null, zero, (u)random, tty;
- PID, network, IPC and UTS namespaces: the program sees only its own processes (the host's are not there to
  be signalled), has no network interface but a down loopback, and every process it started dies with it
  (the namespace's init is killed when the run ends, ``setsid`` or not);
- no capabilities and a fresh uid: run as root, bubblewrap keeps only ``CAP_SETUID``/``CAP_SETGID`` and the
  boot code switches to a uid of its own per program (which clears them); run as another user, bubblewrap's
  user namespace drops every capability and the program keeps that user's uid;
- ``no_new_privs``, a new session (no terminal injection), an empty environment, ``python -I -S -B``, and hard
  rlimits: address space, processes, file size, open files, CPU seconds, no core dumps; a wall-clock timeout
  after which the whole sandbox is SIGKILLed.

Inside, the boot code (:mod:`sandbox_boot`) adds an audit-hook guard and decides completion out of the
program's reach (see there). Where bubblewrap is missing or cannot create its namespaces (a default Docker
container, a kernel without unprivileged user namespaces), :func:`sandbox_info` raises
:class:`SandboxUnavailable` with a one-line message naming the opt-in ``eval.sandbox=unsafe-local``: there is
no silent fallback. ``unsafe-local`` runs the program as the host user with the rlimits and the in-process
guard only, in a fresh folder; every result records the mode.

Verdicts: ``passed`` only if the sandbox exited 0 *and* its last stdout line carries the one-time token the
boot code prints after the program's code object returned. Failure reasons are sanitised to an exception
type and a short message. Limits that remain are listed in ``docs/SANDBOX.md``.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import itertools
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

MODES = ("bwrap", "unsafe-local")
_BOOT_SOURCE = Path(__file__).with_name("sandbox_boot.py").read_text(encoding="utf-8")
UID_BASE = 100_000_000 + (os.getpid() % 1000) * 1_000_000
"""First sandbox uid of this host process (a fresh uid per program after it; concurrent hosts differ)."""
_uid_counter = itertools.count()
WORKDIR = "/sandbox"
_REASON_CHARS = 160
_TRACEBACK = b"Traceback (most recent call last):"
_EXCEPTION_LINE = re.compile(
    r"^((?:[A-Za-z_][A-Za-z0-9_]*\.){0,4}[A-Z][A-Za-z0-9_]{0,60}(?:Error|Exception|Exit|Interrupt|Warning|Iteration))"
    r"(?::\s*(.*))?$"
)


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be had on this host; the message says why and names the opt-in."""


@dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    """Per-program limits. ``max_processes`` counts the program's own process too."""

    timeout_s: float = 10.0
    memory_bytes: int = 1 << 30
    max_processes: int = 16
    max_file_bytes: int = 16 << 20
    max_open_files: int = 64
    output_chars: int = 2000
    tmpfs_bytes: int = 64 << 20

    def __post_init__(self):
        if self.timeout_s <= 0 or self.memory_bytes <= 0 or self.max_processes < 1 or self.tmpfs_bytes < 1:
            raise ValueError(f"invalid sandbox limits: {self}")


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program: ``status`` is "passed", "failed" or "timeout"; ``reason`` a one-line why.

    ``flags`` lists what the guard refused or recorded (``refused:<event>``, ``introspection:<what>``).
    """

    status: str
    returncode: int | None
    wall_s: float
    reason: str
    stdout_tail: str
    stderr_tail: str
    flags: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ----------------------------------------------------------------------------------------------------------
# What the sandbox's root holds: the interpreter, its libraries and its standard library.


def _shared_libraries(binaries: list[str]) -> set[str]:
    """Every shared library ``ldd`` resolves for ``binaries`` (absolute paths)."""
    libs: set[str] = set()
    ldd = shutil.which("ldd")
    for start in range(0, len(binaries), 64) if ldd else ():
        done = subprocess.run([ldd, *binaries[start : start + 64]], capture_output=True, text=True, check=False)
        for line in done.stdout.splitlines():
            path = line.split("=>")[-1].split("(")[0].strip()
            if path.startswith("/") and os.path.exists(path):
                libs.add(path)
    return libs


def _interpreter() -> str:
    """This interpreter's real path (the sandbox holds the file, not the links that lead to it)."""
    return os.path.realpath(sys.executable)


@functools.lru_cache(maxsize=1)
def runtime_binds() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(paths bound read-only at the same place, paths hidden behind an empty tmpfs) for this interpreter."""
    exe = _interpreter()
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    platstdlib = os.path.realpath(sysconfig.get_paths()["platstdlib"])
    dynload = sorted(glob.glob(os.path.join(platstdlib, "lib-dynload", "*.so")))
    binds = {exe, stdlib, platstdlib, *_shared_libraries([exe, *dynload])}
    binds |= {os.path.realpath(p) for p in list(binds)}  # a library reached through a link, at its real place
    for cache in ("/etc/ld.so.cache",):
        if os.path.exists(cache):
            binds.add(cache)
    hidden = [p for d in {stdlib, platstdlib} for p in (f"{d}/site-packages", f"{d}/dist-packages") if os.path.isdir(p)]
    return tuple(sorted(binds)), tuple(sorted(set(hidden)))


def _bwrap_command(bwrap: str, folder: Path, limits: SandboxLimits, root: bool) -> list[str]:
    """The bubblewrap prefix: namespaces, the read-only minimal root, private tmpfs, no capabilities."""
    binds, hidden = runtime_binds()
    cmd = [bwrap, "--die-with-parent", "--new-session", "--clearenv"]
    if root:  # no user namespace: the boot code drops to a fresh uid with the two capabilities kept here
        cmd += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:  # a user namespace (bubblewrap drops every capability in it)
        cmd += ["--unshare-all", "--unshare-user", "--disable-userns"]
    cmd += ["--tmpfs", "/"]
    # Folders on the way to the binds, world-traversable (bubblewrap would copy a 0700 /root from the host).
    for parent in sorted({str(p) for path in binds for p in Path(path).parents if str(p) != "/"}):
        cmd += ["--perms", "0755", "--dir", parent]
    for path in binds:
        cmd += ["--ro-bind", path, path]
    for path in hidden:
        cmd += ["--tmpfs", path]
    cmd += ["--ro-bind", str(folder), WORKDIR]  # before the /tmp tmpfs: the host folder may be under /tmp
    cmd += ["--dev", "/dev"]
    for path in ("/tmp", "/dev/shm"):
        cmd += ["--perms", "1777", "--size", str(limits.tmpfs_bytes), "--tmpfs", path]
    cmd += ["--chdir", WORKDIR, "--remount-ro", "/", "--"]
    return cmd


# ----------------------------------------------------------------------------------------------------------
# Which mode this host allows (probed once per process).


def _probe(cmd: list[str]) -> tuple[bool, str]:
    """Whether the sandbox starts and runs a stdlib extension module; else the last line of its stderr."""
    try:
        done = subprocess.run(cmd, env={}, cwd="/", capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    lines = [ln for ln in done.stderr.decode(errors="replace").splitlines() if ln.strip()]
    return done.returncode == 0, lines[-1][:200] if lines else f"exit status {done.returncode}"


@functools.lru_cache(maxsize=4)
def _bwrap_probe(path_env: str) -> tuple[str | None, str]:
    """(bwrap executable, its version) when bubblewrap runs here, else (None, why). Keyed by PATH (tests
    change it)."""
    bwrap = shutil.which("bwrap", path=path_env)
    if bwrap is None:
        return None, "bwrap not found on PATH (install the 'bubblewrap' package: apt-get install bubblewrap)"
    with tempfile.TemporaryDirectory(prefix="tidpo-sandbox-probe-") as folder:
        os.chmod(folder, 0o755)
        cmd = _bwrap_command(bwrap, Path(folder), SandboxLimits(), os.geteuid() == 0)
        ok, why = _probe([*cmd, _interpreter(), "-I", "-S", "-B", "-c", "import json, math, _struct"])
    if not ok:
        return None, f"bubblewrap cannot create its sandbox here: {why}"
    done = subprocess.run([bwrap, "--version"], capture_output=True, text=True, check=False)
    return bwrap, done.stdout.strip() or "bubblewrap"


def sandbox_info(mode: str = "bwrap") -> dict[str, str]:
    """The isolation a run in ``mode`` gets, for the results; raises :class:`SandboxUnavailable` (one line).

    Keys: ``mode`` ("bwrap" or "unsafe-local"), ``uid`` ("fresh per program", "host user"), ``tool``.
    """
    if mode not in MODES:
        raise ValueError(f"sandbox mode {mode!r} is not one of {list(MODES)}")
    if mode == "unsafe-local":
        return {"mode": mode, "uid": "host user", "tool": "none (rlimits and the in-process guard only)"}
    bwrap, version_or_why = _bwrap_probe(os.environ.get("PATH", ""))
    if bwrap is None:
        raise SandboxUnavailable(
            f"refusing to run untrusted code: {version_or_why}; "
            "set eval.sandbox=unsafe-local to run it unisolated as the host user"
        )
    uid = "fresh per program" if os.geteuid() == 0 else f"host user {os.getuid()} (in a user namespace)"
    return {"mode": mode, "uid": uid, "tool": version_or_why}


# ----------------------------------------------------------------------------------------------------------
# One run.


def pids_of_uids(first_uid: int, last_uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is in ``[first_uid, last_uid]``, from one ``/proc`` scan."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path("/proc", entry, "status").read_text()
        except OSError:
            continue  # exited while we looked
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = int(fields.get("Uid", "-1").split()[0])
        if first_uid <= uid <= last_uid and not fields.get("State", "").strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    """SIGKILL the sandbox's process group (its PID namespace dies with it) and any process of its uid."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group may be gone already
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for _ in range(100 if uid is not None else 0):  # defence in depth: the namespace's death took them all
        pids = pids_of_uids(uid, uid)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _tail(handle, chars: int) -> str:
    """Last ``chars`` characters written to an (unnamed, host-owned) output file."""
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - 4 * chars))
    return handle.read().decode("utf-8", errors="replace")[-chars:]


def _user_process_count() -> int:
    """Number of live processes of this (non-root) user; RLIMIT_NPROC is counted per user."""
    return len(pids_of_uids(os.getuid(), os.getuid()))


def _clean(text: str, chars: int) -> str:
    """Printable ASCII only, whitespace runs collapsed, at most ``chars`` characters."""
    text = "".join(c if c.isprintable() and c.isascii() else " " for c in text)
    return " ".join(text.split())[:chars]


def sanitize_reason(line: str) -> str:
    """An exception type and a short message from the last line of a traceback, or "" when it is not one.

    Only a line like ``SomeError: message`` counts, and only :data:`_REASON_CHARS` printable characters of the
    message are kept: the reason cannot carry much of what the program read or printed.
    """
    match = _EXCEPTION_LINE.match(line.strip())
    if not match:
        return ""
    name, message = match.group(1), _clean(match.group(2) or "", _REASON_CHARS)
    return f"{name}: {message}" if message else name


def _verdict(returncode: int | None, timed_out: bool, stdout: str, error_line: str, token: str):
    """(status, reason, flags) from the exit status, the outputs and the boot code's report line."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    last = (lines[-1].strip().split(" ", 2) if lines else []) + ["", "", ""]
    reported = last[0] == token  # the boot code's report line, which only it can write
    completed = reported and last[1] == "done"
    flags = tuple(f for f in last[2].split(",") if f) if reported else ()
    if timed_out:
        return "timeout", "wall-clock time limit exceeded", flags
    if returncode == 0 and completed:
        return "passed", "", flags
    reason = sanitize_reason(error_line)
    if reason:
        return "failed", reason, flags
    if returncode is not None and returncode < 0:
        return "failed", f"killed by signal {signal.Signals(-returncode).name}", flags
    return "failed", f"exit status {returncode} without completing", flags


def _launch(cmd: list[str], cwd: Path, token: str, limits: SandboxLimits, uid: int | None) -> tuple:
    """Start the sandbox, feed it its token, wait up to the timeout, then kill everything it left.

    stdout and stderr go to unnamed temporary files the host owns. Returns ``(returncode, timed_out,
    stdout_tail, stderr_tail, wall_seconds)``.
    """
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env={}, stdin=subprocess.PIPE, stdout=out, stderr=err,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
        timed_out = False
        try:
            proc.stdin.write((token + "\n").encode())
            proc.stdin.close()
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        except BrokenPipeError:
            pass  # the child died before reading its token; its exit status says why
        finally:
            _kill_all(proc, uid)
        wall = time.monotonic() - start
        err.seek(0)
        data = err.read()  # at most RLIMIT_FSIZE bytes
        last = data.rstrip().rsplit(b"\n", 1)[-1][:4096] if _TRACEBACK in data else b""
        stdout, stderr = _tail(out, limits.output_chars), _tail(err, limits.output_chars)
        return proc.returncode, timed_out, stdout, stderr, last.decode("utf-8", "replace"), wall


def _command(limits: SandboxLimits, mode: str, folder: Path, uid: int | None, guard: bool) -> list[str]:
    """Full command line: sandbox prefix, interpreter, boot code and its arguments."""
    if mode == "bwrap":
        bwrap, _ = _bwrap_probe(os.environ.get("PATH", ""))
        prefix, writable = _bwrap_command(bwrap, folder, limits, uid is not None), ["/tmp", "/dev/shm"]
    else:
        prefix, writable = [], [str(folder)]
    nproc = limits.max_processes if uid is not None else _user_process_count() + limits.max_processes
    cpu = int(limits.timeout_s) + 1
    args = [limits.memory_bytes, nproc, limits.max_file_bytes, limits.max_open_files, cpu, uid or -1, int(guard)]
    return [*prefix, _interpreter(), "-I", "-S", "-B", "-c", _BOOT_SOURCE, *map(str, args), *writable]


def _remove_folder(folder: Path) -> None:
    """Delete the run's folder; an ``OSError`` is re-raised naming it (a leftover would hold untrusted files)."""
    try:
        shutil.rmtree(folder)
    except OSError as exc:
        raise OSError(f"sandbox folder {folder} could not be removed: {exc}") from exc


def run_program(
    source: str, limits: SandboxLimits | None = None, *, mode: str = "bwrap", guard: bool = True
) -> SandboxResult:
    """Run one untrusted Python program and report how it ended (never raises for the program's faults).

    Raises :class:`SandboxUnavailable` when ``mode`` cannot be had here. ``guard=False`` leaves the in-process
    guard out, to check what the kernel isolation holds alone (the red-team tests run each attack both ways).
    """
    limits = limits or SandboxLimits()
    sandbox_info(mode)  # refuses before anything runs
    uid = UID_BASE + next(_uid_counter) % 1_000_000 if mode == "bwrap" and os.geteuid() == 0 else None
    parent = Path(tempfile.mkdtemp(prefix="tidpo-sandbox-"))  # 0700: no other host user looks in
    folder = parent / "run"
    token = secrets.token_hex(16)
    try:
        folder.mkdir(mode=0o755)
        (folder / "program.py").write_text(source, encoding="utf-8")
        os.chmod(folder, 0o755 if mode == "bwrap" else 0o700)  # read-only inside bwrap for the fresh uid
        cmd = _command(limits, mode, folder, uid, guard)
        returncode, timed_out, stdout, stderr, error_line, wall = _launch(cmd, folder, token, limits, uid)
        status, reason, flags = _verdict(returncode, timed_out, stdout, error_line, token)
        stdout = "\n".join(line for line in stdout.splitlines() if not line.startswith(token))
        return SandboxResult(status, returncode, wall, reason, stdout, stderr, flags)
    finally:
        _remove_folder(parent)


def run_programs(
    sources: list[str], limits: SandboxLimits | None = None, *, workers: int = 2, mode: str = "bwrap"
) -> list[SandboxResult]:
    """Run many programs with a small thread pool (each in its own sandbox); results in order."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    sandbox_info(mode)  # refuse once, before starting any
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits, mode=mode), sources))
