"""Hostile programs against the code sandbox, each with a host-side check of containment.

Used by ``tests/evaluation/test_redteam.py`` and ``benchmarks/bench_redteam.py``. Standard library only, and the
sandbox module is passed in (:func:`run_suite`), so that the suite also runs under a system interpreter as an
unprivileged user, without the project installed.

Each :class:`Attack` (the table: :mod:`redteam_attacks`, beside this file, loaded by path) is a program template
(``string.Template``: ``$secret``, ``$secret_file``, ``$open_dir``, ``$port``, ``$unix_socket``, ``$victim_pid``,
``$repo_file``, ``$shm_file``, ``$tmp_name``) and a check that returns what escaped (``None`` when contained). The
bait is set up on the host by :class:`Bait`: a secret in a 0700 folder, a world-writable folder with an "output
file" and a fake Ray socket folder, a loopback TCP listener and a Unix socket listener, a victim process of the host
user, a file name in ``/dev/shm`` and ``/tmp``. ``kernel=False`` marks the attacks that only make sense against the
in-process guard (verdict forgery: with the guard off the program is trusted to report its own completion);
``known_limit`` marks a documented weakness that is expected to get through.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import socket
import stat
import string
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

BOOT_MARKER = "Boot code of the sandboxed child"
"""A phrase of the boot code's source: it is on the command line of every sandboxed process."""


class Bait:
    """Host-side targets for one suite run; :meth:`close` removes them."""

    def __init__(self) -> None:
        self.secret = "REDTEAM-SECRET-" + secrets.token_hex(8)
        self.root = Path(tempfile.mkdtemp(prefix="tidpo-redteam-"))
        os.chmod(self.root, 0o755)
        private = self.root / "private"
        private.mkdir(mode=0o700)
        self.secret_file = private / "secret.txt"
        self.secret_file.write_text(self.secret)
        self.open_dir = self.root / "open"
        self.open_dir.mkdir()
        os.chmod(self.open_dir, 0o1777)  # like /tmp: anyone may create files here
        self.output_file = self.open_dir / "humaneval.json"
        self.output_file.write_text('{"pass@1": 0.0}')
        os.chmod(self.output_file, 0o666)
        self.ray_socket = self.open_dir / "ray" / "sockets" / "raylet"
        self.ray_socket.parent.mkdir(parents=True)
        self.ray_socket.write_text("socket placeholder")
        self.shm_file = Path("/dev/shm") / f"tidpo-redteam-{secrets.token_hex(6)}"
        self.tmp_name = f"tidpo-redteam-{secrets.token_hex(6)}"
        self.repo_file = Path(__file__).resolve()
        self.accepted: list[str] = []
        self._tcp = socket.create_server(("127.0.0.1", 0))
        self.port = self._tcp.getsockname()[1]
        self.unix_socket = self.open_dir / "ray.sock"
        self._unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._unix.bind(str(self.unix_socket))
        os.chmod(self.unix_socket, 0o777)
        for server in (self._tcp, self._unix):
            server.listen()
            server.settimeout(0.2)
            threading.Thread(target=self._serve, args=(server,), daemon=True).start()
        self.victim = subprocess.Popen(["sleep", "600"], start_new_session=True)

    def _serve(self, server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            self.accepted.append(str(server.getsockname()))
            conn.close()

    def fields(self) -> dict[str, Any]:
        return {
            "secret": self.secret,
            "secret_file": self.secret_file,
            "open_dir": self.open_dir,
            "port": self.port,
            "unix_socket": self.unix_socket,
            "victim_pid": self.victim.pid,
            "repo_file": self.repo_file,
            "shm_file": self.shm_file,
            "tmp_name": self.tmp_name,
        }

    def close(self) -> None:
        self._tcp.close()
        self._unix.close()
        self.victim.kill()
        self.victim.wait()
        with contextlib.suppress(FileNotFoundError):
            self.shm_file.unlink()
        with contextlib.suppress(FileNotFoundError):
            (Path("/tmp") / self.tmp_name).unlink()
        shutil.rmtree(self.root, ignore_errors=True)


def _load_sibling(name: str) -> ModuleType:
    """A module of this folder loaded by path: the suite also runs as a bare file under ``python -I -S`` with no
    package on sys.path (:data:`RUNNER`). Registered in ``sys.modules`` (dataclasses look their module up there)."""
    key = f"tidpo_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).resolve().with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


_attacks = _load_sibling("redteam_attacks")
Attack, ATTACKS = _attacks.Attack, _attacks.ATTACKS


# ----------------------------------------------------------------------------------------------------------
# Running the suite.


def _live_sandboxed(sandbox: ModuleType) -> list[int]:
    if os.geteuid() == 0:
        return sandbox.pids_of_uids(sandbox.UID_BASE, sandbox.UID_BASE + 999_999)
    pids = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            path = Path("/proc", entry)
            mine = entry.isdigit() and path.stat().st_uid == os.getuid()
            if mine and BOOT_MARKER.encode() in (path / "cmdline").read_bytes():
                state = (path / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry))
    return pids


def _describe(pids: list[int]) -> str:
    out = []
    for pid in pids[:4]:
        with contextlib.suppress(OSError):
            stat_line = Path("/proc", str(pid), "stat").read_text()
            cmd = Path("/proc", str(pid), "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            out.append(f"{pid} {cmd} state {stat_line.rsplit(')', 1)[1].split()[0]}")
    return "; ".join(out)


def leftover_processes(sandbox: ModuleType, *, grace_s: float = 5.0) -> list[int]:
    """Sandboxed processes still alive ``grace_s`` after a run (the kernel tears a PID namespace down
    asynchronously): a run's uid (as root), or the boot code on a command line of this user's."""
    deadline = time.monotonic() + grace_s
    while (pids := _live_sandboxed(sandbox)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


@dataclass
class Outcome:
    name: str
    category: str
    contained: bool
    escaped: str | None
    known_limit: bool
    status: str
    reason: str
    flags: tuple[str, ...]
    wall_s: float


def run_attack(attack: Attack, sandbox: ModuleType, bait: Bait, *, mode: str, guard: bool, limits: Any) -> Outcome:
    """Run one attack (and its companion) in ``mode`` and check the host afterwards."""
    fields = bait.fields()
    source = string.Template(attack.source).substitute(fields)
    limits = type(limits)(**{**limits.__dict__, **attack.limits})
    os.environ["TIDPO_REDTEAM_SECRET"] = bait.secret  # the program must not see the host's environment
    try:
        if attack.companion:
            companion = string.Template(attack.companion).substitute(fields)
            with ThreadPoolExecutor(2) as pool:
                victim = pool.submit(sandbox.run_program, companion, limits, mode=mode, guard=guard)
                result = sandbox.run_program(source, limits, mode=mode, guard=guard)
                victim.result()
        else:
            result = sandbox.run_program(source, limits, mode=mode, guard=guard)
    finally:
        os.environ.pop("TIDPO_REDTEAM_SECRET", None)
    time.sleep(0.1)
    escaped = attack.check(result, bait)
    left = leftover_processes(sandbox)
    if escaped is None and left:
        escaped = f"{len(left)} sandboxed processes outlived the run: {_describe(left)}"
    if escaped is None and "daemon" in attack.name:
        time.sleep(3.5)  # give a surviving daemon the time to act
        escaped = attack.check(result, bait)
    return Outcome(
        attack.name, attack.category, escaped is None, escaped, attack.known_limit,
        result.status, result.reason, tuple(result.flags), round(result.wall_s, 2),
    )  # fmt: skip


def run_suite(sandbox: ModuleType, *, mode: str = "bwrap", guard: bool = True, limits: Any = None) -> list[Outcome]:
    """Every attack (those with ``kernel=False`` only when ``guard``), each against fresh bait."""
    limits = limits or sandbox.SandboxLimits(timeout_s=3.0, memory_bytes=256 << 20, max_processes=8)
    outcomes = []
    for attack in ATTACKS:
        if not guard and not attack.kernel:
            continue
        bait = Bait()
        try:
            outcomes.append(run_attack(attack, sandbox, bait, mode=mode, guard=guard, limits=limits))
        finally:
            bait.close()
    return outcomes


def refused_suite(sandbox: ModuleType, *, mode: str = "bwrap") -> list[Outcome]:
    """Where the sandbox is unavailable: every attack must be refused before anything runs."""
    outcomes = []
    for attack in ATTACKS:
        try:
            sandbox.run_program(attack.source, mode=mode)
            outcomes.append(Outcome(attack.name, attack.category, False, "ran", attack.known_limit, "ran", "", (), 0))
        except sandbox.SandboxUnavailable as exc:
            outcomes.append(Outcome(attack.name, attack.category, True, None, False, "refused", str(exc), (), 0))
    return outcomes


def is_world_traversable(path: str) -> bool:
    """Whether every folder on the way to ``path`` lets other users through (for an unprivileged run)."""
    p = Path(path).resolve()
    return all(q.stat().st_mode & stat.S_IXOTH for q in [p, *p.parents] if q.is_dir())


RUNNER = r"""
import importlib.util, json, sys

def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

sandbox, redteam = load("tidpo_sandbox", sys.argv[1]), load("tidpo_redteam", sys.argv[2])
try:
    sandbox.sandbox_info("bwrap")
    outcomes = redteam.run_suite(sandbox, guard=sys.argv[3] == "1")
    situation = "ran"
except sandbox.SandboxUnavailable as exc:
    outcomes, situation = redteam.refused_suite(sandbox), str(exc)
print(json.dumps({"situation": situation, "outcomes": [o.__dict__ for o in outcomes]}))
"""
"""Runs the suite in a separate interpreter (``RUNNER SANDBOX_PY REDTEAM_PY GUARD``), printing JSON."""


def unprivileged_command(user: int = 65534) -> list[str] | None:
    """A command prefix that runs :data:`RUNNER` as ``user`` under an interpreter that user can execute, or
    None where that cannot be arranged (not root, no ``setpriv``, no interpreter outside 0700 folders)."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        return None
    here = Path(__file__).resolve().parent
    candidates = [os.path.realpath(p) for p in (sys.executable, "/usr/bin/python3") if p and os.path.exists(p)]
    python = next((p for p in candidates if is_world_traversable(p)), None)
    if python is None or not is_world_traversable(str(here / "sandbox.py")):
        return None
    prefix = [setpriv, f"--reuid={user}", f"--regid={user}", "--clear-groups", "--"]
    return [*prefix, python, "-I", "-S", "-c", RUNNER, str(here / "sandbox.py"), str(here / "redteam.py")]
