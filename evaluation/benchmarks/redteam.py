"""Hostile programs against the code sandbox, each with a host-side check of containment.

Used by ``tests/evaluation/test_redteam.py`` and ``benchmarks/bench_redteam.py``. Standard library only, and the
sandbox module is passed in (:func:`run_suite`), so that the suite also runs under a system interpreter as an
unprivileged user, without the project installed.

Each :class:`Attack` is a program template (``string.Template``: ``$secret``, ``$secret_file``, ``$open_dir``,
``$port``, ``$unix_socket``, ``$victim_pid``, ``$repo_file``, ``$shm_file``, ``$tmp_name``) and a check that
returns what escaped (``None`` when contained). The bait is set up on the host by :class:`Bait`: a secret in a
0700 folder, a world-writable folder with an "output file" and a fake Ray socket folder, a loopback TCP
listener and a Unix socket listener, a victim process of the host user, a file name in ``/dev/shm`` and
``/tmp``. ``kernel=False`` marks the attacks that only make sense against the in-process guard (verdict
forgery: with the guard off the program is trusted to report its own completion); ``known_limit`` marks a
documented weakness that is expected to get through.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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


Check = Callable[[Any, Bait], "str | None"]


@dataclass(frozen=True)
class Attack:
    """One hostile program and how to tell whether it got out."""

    name: str
    category: str
    source: str
    check: Check
    kernel: bool = True
    known_limit: bool = False
    companion: str | None = None  # a victim program run at the same time (cross-sample attacks)
    limits: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Checks: each returns what escaped, or None.


def _output(result: Any) -> str:
    return f"{result.stdout_tail}\n{result.stderr_tail}\n{result.reason}"


def no_secret(result: Any, bait: Bait) -> str | None:
    return "the secret reached the program's output" if bait.secret in _output(result) else None


def no_shadow(result: Any, bait: Bait) -> str | None:
    return "/etc/shadow content in the output" if "root:" in result.stdout_tail else None


def no_project_code(result: Any, bait: Bait) -> str | None:
    return "project source in the output" if "BOOT_MARKER = " in _output(result) else None


def not_passed(result: Any, bait: Bait) -> str | None:
    return "counted as a pass" if result.passed else None


def no_escalation(result: Any, bait: Bait) -> str | None:
    return f"gained a privilege: {result.stdout_tail.strip()[-120:]}" if "ESCALATED" in result.stdout_tail else None


def host_unchanged(result: Any, bait: Bait) -> str | None:
    """No new file in the open folder, the bait files intact, nothing left in /tmp or /dev/shm."""
    found = sorted(p.name for p in bait.open_dir.iterdir()) != ["humaneval.json", "ray", "ray.sock"]
    if found:
        return f"wrote into the host's open folder: {sorted(p.name for p in bait.open_dir.iterdir())}"
    if bait.output_file.read_text() != '{"pass@1": 0.0}':
        return "overwrote the output file"
    if not bait.ray_socket.exists():
        return "removed a file of Ray's socket folder"
    for path in (bait.shm_file, Path("/tmp") / bait.tmp_name):
        if path.exists():
            return f"left {path} on the host ({path.stat().st_size} bytes)"
    return None


def no_connection(result: Any, bait: Bait) -> str | None:
    time.sleep(0.3)  # let the accept threads see a late connection
    return f"reached a host listener: {bait.accepted}" if bait.accepted else None


def victim_alive(result: Any, bait: Bait) -> str | None:
    return "killed a host process" if bait.victim.poll() is not None else None


def all_of(*checks: Check) -> Check:
    def check(result: Any, bait: Bait) -> str | None:
        return next((why for why in (c(result, bait) for c in checks) if why), None)

    return check


# ----------------------------------------------------------------------------------------------------------
# The attacks.

_HEX = "import re\ndef hexes(text):\n    return re.findall(r'\\b[0-9a-f]{32}\\b', str(text))\n"

ATTACKS: tuple[Attack, ...] = (
    # Reading what the host holds.
    Attack("read /etc/shadow", "read", "print(open('/etc/shadow').read())\n", no_shadow),
    Attack("read a 0700 folder", "read", "print(open('$secret_file').read())\n", no_secret),
    Attack("read the project's code", "read", "print(open('$repo_file').read())\n", no_project_code),
    Attack(
        "list the host's folders",
        "read",
        "import os\nfor d in ['/', '/root', '/etc', '/home', '/work', '/tmp', '/dev/shm', '/proc']:\n"
        "    try:\n        print(d, sorted(os.listdir(d)))\n    except OSError as e:\n        print(d, e)\n"
        "print(open('$secret_file').read())\n",
        no_secret,
    ),
    Attack(
        "read a concurrent sample's folder",
        "read",
        "import glob, os, time\ntime.sleep(0.5)\n"
        "for path in glob.glob('/tmp/**', recursive=True) + glob.glob('/dev/shm/*') + glob.glob('/*/*'):\n"
        "    try:\n        print(open(path).read())\n    except OSError:\n        pass\n",
        no_secret,
        companion="SECRET = '$secret'\nimport time\ntime.sleep(2)\n",
    ),
    Attack(
        "read the environment",
        "read",
        "import os\nprint(dict(os.environ))\n",
        no_secret,
    ),
    # Writing where the host would see it.
    Attack("write with open()", "write", "open('$open_dir/escaped', 'w').write('x')\n", host_unchanged),
    Attack(
        "write with posix.open",
        "write",
        "import posix\nposix.close(posix.open('$open_dir/escaped', posix.O_WRONLY | posix.O_CREAT))\n",
        host_unchanged,
    ),
    Attack(
        "write with _io.open", "write", "import _io\n_io.open('$open_dir/escaped', 'w').write('x')\n", host_unchanged
    ),
    Attack(
        "overwrite the output file",
        "write",
        "open('$open_dir/humaneval.json', 'w').write('{\"pass@1\": 1.0}')\n",
        host_unchanged,
    ),
    Attack(
        "remove Ray's socket files",
        "write",
        "import posix\nposix.unlink('$open_dir/ray/sockets/raylet')\n",
        host_unchanged,
    ),
    Attack("write into /dev/shm", "write", "open('$shm_file', 'w').write('x' * 1000)\n", host_unchanged),
    Attack(
        "leave 200 MB in /tmp and /dev/shm",
        "write",
        "import posix\nfor path in ['/tmp/$tmp_name', '$shm_file']:\n"
        "    fd = posix.open(path, posix.O_WRONLY | posix.O_CREAT)\n"
        "    try:\n        for _ in range(100):\n            posix.write(fd, b'x' * (1 << 20))\n"
        "    except OSError as e:\n        print(path, e)\n",
        host_unchanged,
        limits={"max_file_bytes": 256 << 20},
    ),
    Attack(
        "rewrite its own program.py",
        "write",
        "import posix\nfd = posix.open('program.py', posix.O_WRONLY | posix.O_TRUNC)\nposix.write(fd, b'pass')\n"
        "assert False\n",
        not_passed,
    ),
    # Processes.
    Attack(
        "posix.system",
        "process",
        "import posix\nposix.system('touch $open_dir/escaped')\n",
        host_unchanged,
    ),
    Attack(
        "subprocess through _posixsubprocess",
        "process",
        "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'touch $open_dir/escaped'])\n",
        host_unchanged,
    ),
    Attack(
        "setsid daemon that outlives the run",
        "process",
        "import posix, time\nif posix.fork() == 0:\n    posix.setsid()\n    time.sleep(3)\n"
        "    open('$open_dir/escaped', 'w').write('daemon')\n    posix._exit(0)\n",
        all_of(host_unchanged),
    ),
    Attack(
        "fork bomb",
        "process",
        "import posix, time\nwhile True:\n    if posix.fork() == 0:\n        time.sleep(30)\n",
        not_passed,
        limits={"max_processes": 8},
    ),
    Attack(
        "memory bomb in one process",
        "process",
        "x = bytearray(10**10)\n",
        not_passed,
    ),
    Attack(
        "memory bomb across forked children",
        "process",
        "import posix, time\nfor _ in range(16):\n    if posix.fork() == 0:\n"
        "        x = [bytearray(1 << 20) for _ in range(1 << 12)]\n        time.sleep(30)\n"
        "time.sleep(30)\n",
        not_passed,
        limits={"max_processes": 8},
    ),
    Attack("endless loop", "process", "while True:\n    pass\n", not_passed),
    # Signals.
    Attack("kill a host process", "signal", "import posix\nposix.kill($victim_pid, 9)\n", victim_alive),
    Attack("kill every process it may", "signal", "import posix\nposix.kill(-1, 9)\n", victim_alive),
    Attack(
        "kill its process group and init",
        "signal",
        "import posix\nposix.kill(1, 9)\nposix.killpg(0, 9)\n",
        victim_alive,
    ),  # fmt: skip
    # Network.
    Attack(
        "connect to a loopback listener",
        "network",
        "import socket\nsocket.create_connection(('127.0.0.1', $port), timeout=1)\n",
        no_connection,
    ),
    Attack(
        "connect through _socket",
        "network",
        "import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\ns.settimeout(1)\n"
        "s.connect(('127.0.0.1', $port))\n",
        no_connection,
    ),
    Attack(
        "connect to a host Unix socket",
        "network",
        "import _socket\ns = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)\ns.connect('$unix_socket')\n",
        no_connection,
    ),
    # Privileges.
    Attack(
        "regain privileges",
        "privilege",
        "import posix\nfor name, call in [('setuid', lambda: posix.setuid(0)), ('chroot', lambda: posix.chroot('/')),"
        " ('mknod', lambda: posix.mknod('/tmp/dev', 0o600 | 0o020000, posix.makedev(1, 3))),"
        " ('setgroups', lambda: posix.setgroups([0]))]:\n"
        "    try:\n        call()\n        print('ESCALATED', name)\n    except OSError:\n        pass\n",
        no_escalation,
    ),
    # Verdict forgery: the honest outcome of each is a failure.
    Attack(
        "take the token from the boot code's frames",
        "verdict",
        _HEX + "import sys, os\nf = sys._getframe()\nfound = []\nwhile f is not None:\n"
        "    found += hexes(f.f_locals) + hexes(f.f_globals)\n    f = f.f_back\n"
        "print(found[-1] if found else 'none')\nsys.stdout.flush()\nos._exit(0)\n",
        not_passed,
        kernel=False,
    ),
    Attack(
        "take the token from other threads' frames",
        "verdict",
        _HEX + "import sys, os\nfound = []\nfor f in sys._current_frames().values():\n"
        "    while f is not None:\n        found += hexes(f.f_locals)\n        f = f.f_back\n"
        "print(found[-1] if found else 'none')\nsys.stdout.flush()\nos._exit(0)\n",
        not_passed,
        kernel=False,
    ),
    Attack(
        "take the token from the garbage collector",
        "verdict",
        _HEX + "import gc, sys, os\nfound = [h for o in gc.get_objects() for h in hexes(o)]\n"
        "print(found[-1] if found else 'none')\nsys.stdout.flush()\nos._exit(0)\n",
        not_passed,
        kernel=False,
    ),
    Attack(
        "swap check with sys.settrace",
        "verdict",
        "import sys\ndef tracer(frame, event, arg):\n    frame.f_globals['check'] = lambda c: None\n    return None\n"
        "sys.settrace(tracer)\ndef check(candidate):\n    assert candidate(1) == 2\ncheck(lambda x: x)\n",
        not_passed,
        kernel=False,
    ),
    Attack(
        "read the token with ctypes",
        "verdict",
        "import ctypes\nprint(ctypes.string_at(id(object()), 64))\nassert False\n",
        not_passed,
        kernel=False,
    ),
    Attack(
        "exit 0 part-way with sys.exit", "verdict", "import sys\nsys.exit(0)\nassert False\n", not_passed, kernel=False
    ),  # fmt: skip
    Attack(
        "exit 0 part-way with os._exit", "verdict", "import os\nos._exit(0)\nassert False\n", not_passed, kernel=False
    ),  # fmt: skip
    Attack(
        "print a made-up token",
        "verdict",
        "import os, secrets\nprint(secrets.token_hex(16))\nos._exit(0)\n",
        not_passed,
        kernel=False,
    ),
    Attack(
        "keep a thread alive after failing",
        "verdict",
        "import threading, time\nthreading.Thread(target=time.sleep, args=(30,)).start()\nassert False\n",
        not_passed,
        kernel=False,
    ),
    Attack(
        "always-equal result (a known HumanEval weakness)",
        "verdict",
        "class Yes:\n    def __eq__(self, other):\n        return True\n"
        "def check(candidate):\n    assert candidate(1) == 2\ncheck(lambda x: Yes())\n",
        not_passed,
        kernel=False,
        known_limit=True,
    ),
)


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
