"""The attack table of the sandbox red-team suite (:mod:`redteam` runs it): each :class:`Attack` is a hostile
program template and a host-side check of containment that returns what escaped (``None`` when contained).

Standard library only and free of project imports: :mod:`redteam` loads this file by path from its own folder,
also when the suite runs under a bare ``python -I -S`` as an unprivileged user (``redteam.RUNNER``). A check gets
the sandbox's result and the host's bait (``redteam.Bait``: its secret, open folder, listeners, victim process).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Check = Callable[[Any, Any], "str | None"]  # (sandbox result, redteam.Bait) -> what escaped


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


def no_secret(result: Any, bait: Any) -> str | None:
    return "the secret reached the program's output" if bait.secret in _output(result) else None


def no_shadow(result: Any, bait: Any) -> str | None:
    return "/etc/shadow content in the output" if "root:" in result.stdout_tail else None


def no_project_code(result: Any, bait: Any) -> str | None:
    return "project source in the output" if "BOOT_MARKER = " in _output(result) else None


def not_passed(result: Any, bait: Any) -> str | None:
    return "counted as a pass" if result.passed else None


def no_escalation(result: Any, bait: Any) -> str | None:
    return f"gained a privilege: {result.stdout_tail.strip()[-120:]}" if "ESCALATED" in result.stdout_tail else None


def host_unchanged(result: Any, bait: Any) -> str | None:
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


def no_connection(result: Any, bait: Any) -> str | None:
    time.sleep(0.3)  # let the accept threads see a late connection
    return f"reached a host listener: {bait.accepted}" if bait.accepted else None


def victim_alive(result: Any, bait: Any) -> str | None:
    return "killed a host process" if bait.victim.poll() is not None else None


def all_of(*checks: Check) -> Check:
    def check(result: Any, bait: Any) -> str | None:
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
