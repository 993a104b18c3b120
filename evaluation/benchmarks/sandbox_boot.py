"""Boot code of the sandboxed child (run as ``python -I -S -c <this file's text> LIMITS...``).

Runs inside the sandbox before the untrusted program and is the only trusted code there. In order:

1. reads a one-time token from stdin (kept in a local of :func:`main`, see below);
2. as root inside the bubblewrap sandbox (which left it only ``CAP_SETUID``/``CAP_SETGID``), switches to the
   run's fresh uid: every capability is gone after that;
3. sets hard resource limits (soft = hard, so the program cannot raise them);
4. installs an audit hook (:func:`sys.addaudithook`; Python code cannot remove one) that refuses process
   creation, signals to other processes, sockets, writes outside the writable folders, ``ctypes``, trace and
   profile functions, the garbage collector's object walks and other threads' frames, and records frame
   introspection done by the program's own code (``sys._getframe``, ``tb_frame``, ``gi_frame``, ...);
5. runs ``program.py`` in a new thread started from C (``_thread.start_new_thread`` on ``deque(map(exec,
   ...))``), so no frame of this boot code is below the program's frames: ``f_back`` ends at the program;
6. the main thread waits; only when the program's code object returned does the next code object (run by the
   same ``map``, in a namespace the program never sees) release the lock it waits on. Then the main thread
   prints the token, ``done`` and the recorded flags as the last stdout line and exits 0. If the program's
   thread ends another way (an exception, ``SystemExit``), it prints the token, ``raised`` and the flags and
   exits 1.

The token lives only in the main thread's frame, which the program can reach only through the refused calls
(``sys._current_frames``, ``gc.get_objects``, ``ctypes``). What the guard cannot stop is code that reaches
the C level another way (a compiled extension written to ``/tmp``): the bubblewrap sandbox (``sandbox.py``)
is what holds then. This module must not import anything from the project: it runs with ``-I -S``.
"""

import sys

FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"})
REFUSED_EVENTS = frozenset({
    "sys.settrace", "sys.setprofile", "sys._current_frames", "sys._current_exceptions",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
    "os.setsid", "os.setpgid", "os.killpg", "subprocess.Popen", "pty.spawn",
    "socket.__new__", "socket.bind", "socket.connect", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "ctypes.addressof",
    "cpython._PySys_ClearAuditHooks", "cpython.run_command", "code.__new__",
})  # fmt: skip
"""Audit events the guard refuses outright (the program gets a PermissionError)."""
REFUSED_IMPORTS = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "_socket", "socket", "_xxsubinterpreters"})
PATH_EVENTS = frozenset({
    "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink",
    "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.mkfifo", "os.mknod", "shutil.rmtree",
})  # fmt: skip


def _set_limits(memory, nproc, fsize, nofile, cpu):
    """Hard rlimits: address space, processes, file size, open files, CPU seconds, no core dumps."""
    import resource

    for name, value in (
        ("RLIMIT_AS", memory),
        ("RLIMIT_NPROC", nproc),
        ("RLIMIT_FSIZE", fsize),
        ("RLIMIT_NOFILE", nofile),
        ("RLIMIT_CPU", cpu),
        ("RLIMIT_CORE", 0),
    ):
        resource.setrlimit(getattr(resource, name), (value, value))


def _drop_to(uid):
    """setresgid/setresuid to ``uid`` with no groups: the kernel clears every capability on the way."""
    import os

    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:  # pragma: no cover - the kernel refused
        raise SystemExit("sandbox: could not switch to the run's uid")


def _make_hook(writable, flags):
    """The audit hook: refuse what :data:`REFUSED_EVENTS` names, guard writes and signals, record introspection.

    ``writable`` are the folders writes may go to; ``flags`` (a list) collects what was recorded.
    """
    import os

    own_pid = os.getpid()
    write_bits = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    realpath, fsdecode, getframe = os.path.realpath, os.fsdecode, sys._getframe
    busy = [False]

    def inside(path):
        if isinstance(path, int):
            return True  # an already-open file descriptor
        real = realpath(fsdecode(path))
        return any(real == root or real.startswith(root + "/") for root in writable)

    def refuse(flag, what=None):
        note(f"refused:{flag}")
        raise PermissionError(f"sandbox: {what or flag.replace(':', ' ')} refused")

    def note(flag):
        if flag not in flags and len(flags) < 16:
            flags.append(flag)

    def from_program():
        """Whether the Python code that raised the event is the program's own (not the stdlib's)."""
        if busy[0]:
            return False
        busy[0] = True
        try:
            caller = getframe(2)  # 0: this function, 1: the hook, 2: the code that raised the event
            return caller.f_code.co_filename == "program.py"
        finally:
            busy[0] = False

    def hook(event, args):
        if busy[0]:
            return
        if event in REFUSED_EVENTS:
            refuse(event)
        elif event == "import" and args[0].partition(".")[0] in REFUSED_IMPORTS:
            refuse(f"import:{args[0]}")
        elif event == "open" and not isinstance(args[0], int):
            mode, oflags = args[1] or "", args[2] or 0
            if (any(c in mode for c in "wax+") or oflags & write_bits) and not inside(args[0]):
                refuse("open-for-writing", f"writing {fsdecode(args[0])[:80]!r}")
        elif event in PATH_EVENTS:
            for arg in args[:2]:
                if isinstance(arg, (str, bytes)) and not inside(arg):
                    refuse(event, f"{event} outside the writable folders")
        elif event == "os.kill" and args[0] != own_pid:
            refuse(event, "signalling another process")
        elif event == "sys._getframe" and from_program():
            note("introspection:sys._getframe")
        elif event == "object.__getattr__" and args[1] in FRAME_ATTRIBUTES and from_program():
            note(f"introspection:{args[1]}")

    return hook


def main():
    """Token, uid, limits, guard; then run ``program.py`` in its own thread and report completion."""
    import _thread
    import os
    from collections import deque

    token = sys.stdin.readline().strip()
    memory, nproc, fsize, nofile, cpu, uid, guard = (int(x) for x in sys.argv[1:8])
    writable = sys.argv[8:]
    for name in list(os.environ):  # bubblewrap's --chdir sets PWD; the program gets an empty environment
        del os.environ[name]
    if uid >= 0:
        _drop_to(uid)
    _set_limits(memory, nproc, fsize, nofile, cpu)
    with open("program.py", encoding="utf-8") as handle:
        source = handle.read()
    program = compile(source, "program.py", "exec")
    flags = []
    if guard:
        sys.addaudithook(_make_hook([os.path.realpath(w) for w in writable], flags))
    started, done = _thread.allocate_lock(), _thread.allocate_lock()
    started.acquire()
    done.acquire()
    signal = compile("lock.release()", "<sandbox>", "exec")
    namespace = {"__name__": "__main__", "__builtins__": __builtins__, "__file__": "program.py"}
    # map() calls exec on `signal` (the thread runs), then the program, then (only if that returned) `signal`
    # again, each in a namespace of its own; deque(..., 0) drains it from C: no Python frame of ours sits
    # below the program's, and the program's namespace holds neither lock.
    codes, namespaces = (signal, program, signal), ({"lock": started}, namespace, {"lock": done})
    _thread.stack_size(16 << 20)
    _thread.start_new_thread(deque, (map(exec, codes, namespaces), 0))
    started.acquire()  # from here on the thread is counted by _thread._count()
    while not done.acquire(timeout=0.01):
        if _thread._count() == 0:  # the thread ended: it released `done` just now (look again) or it raised
            completed = done.acquire(blocking=False)
            break
    else:
        completed = True
    _report(token, "done" if completed else "raised", flags)
    os._exit(0 if completed else 1)


def _report(token, outcome, flags):
    """The last stdout line: ``<token> <done|raised> <flag,flag,...>`` (only the host knows the token)."""
    import contextlib
    import os

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # the program closed or broke it
            stream.flush()
    os.write(1, f"\n{token} {outcome} {','.join(flags)}\n".encode())


if __name__ == "__main__":
    main()
