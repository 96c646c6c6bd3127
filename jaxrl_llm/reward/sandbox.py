"""Run model-written Python in a contained child process, and score it against test snippets.

``run_python(code, tests)`` runs ``code`` and then each test snippet (``"assert add(2, 3) == 5"``) in one
fresh child process and returns a :class:`SandboxResult` (which tests passed, whether it timed out, a short
error). ``code_exec_reward(completion, tests, timeout_s=...)`` is the reward: the fraction of tests passed by
the program in a model's answer (:func:`extract_code`). :class:`CodeExecutor` runs many in parallel.

How results travel back
-----------------------
The child is this file run as a script (``python -I -S -B sandbox.py BASE``). The parent writes the job
(code, tests, limits, a random nonce, the number of a pipe's write end) to a file that the child reads and
deletes before anything untrusted runs. The harness executes the solution in a fresh namespace, then each
test in that namespace inside ``try/except BaseException``, and after each one writes a record
``NONCE test I pass`` (or ``fail``) to the pipe. stdout and stderr belong to the untrusted code and are only
captured, to files read back at most 64 KiB each. The parent counts a test as passed only from a record
with the run's nonce, for an index not reported before, after a record that the solution ran; a test that
did not report (crash, ``os._exit``, kill, timeout) failed. Printing a guess of the protocol, or writing
one to every file descriptor, forges nothing without the nonce.

Isolation layers (the names in ``SandboxResult.isolation`` are those active in a run)
--------------------------------------------------------------------------------
On any Linux host:

* a separate process, ``sys.executable -I -S -B`` (no user site, no ``PYTHON*`` variables, no ``site``),
  started with ``start_new_session=True``: it leads its own process group;
* an environment with nothing inherited (a minimal ``PATH``, ``HOME`` and ``TMPDIR`` in its directory,
  ``LANG``), a private temporary working directory removed afterwards, stdin from ``/dev/null``;
* ``"rlimits"``, set by the harness before untrusted code runs: ``RLIMIT_CPU`` (SIGXCPU, then SIGKILL),
  ``RLIMIT_AS`` (allocations beyond it raise ``MemoryError``), ``RLIMIT_FSIZE`` (a print bomb stops at
  ``max_file_mb``), ``RLIMIT_NOFILE``, ``RLIMIT_CORE=0``, and ``RLIMIT_NPROC`` (below);
* a supervisor: the harness forks the worker that runs the untrusted code and stays behind as a child
  subreaper, so that descendants orphaned by a ``setsid`` or a dead parent become its children. When the
  worker ends, or when the parent asks (SIGTERM at the timeout), it SIGKILLs and reaps every descendant;
* a wall-clock timeout, after which the parent also kills the whole process group (``os.killpg``);
* ``"python-guards"``: an audit hook (``sys.addaudithook``), installed before the solution runs, refuses
  where CPython raises its audit events, C level included: process creation (``os.fork``, ``subprocess``,
  ``os.exec*``, ``os.system``, ``os.posix_spawn``), signals (``os.kill``), ``ctypes``, network sockets and
  name lookups (every non-``AF_UNIX`` socket; every ``connect``, ``bind``, ``sendto``), writes outside the
  working directory (``open`` for writing, ``mkdir``, ``rename``, ``remove``, ``chmod``, links, ...) and
  reads of other processes' ``/proc`` entries. This is defence in depth and the fallback where kernel
  layers are missing, not a boundary: code in the same interpreter can get around it (through ``gc`` or
  frame introspection, say). It replaces patching ``socket.socket`` and friends, which ``_socket`` or a
  module reload would undo.

Depending on the host (kernel layers, each tried and skipped when refused):

* ``"uid"`` (the parent runs as root): the worker drops to a fresh unprivileged uid and gid, one per run
  from a high range no account uses (``nobody`` where a container does not map it). Root-owned files are
  then out of reach by permissions, ``RLIMIT_NPROC`` is a per-sandbox limit, and processes of the run are
  killable by uid. The standard library stays importable through ``/proc/self/fd`` handles opened before
  the drop, so a Python installed under a 0700 ``/root`` works.
* ``"userns"`` (not root, unprivileged user namespaces allowed): the namespaces below are created in a
  new user namespace (uid mapped to itself); every capability is dropped once they are set up.
* ``"netns"``: a new, empty network namespace (not even loopback is up): no connection anywhere, the
  parent's local listeners included.
* ``"pidns"``: a new PID namespace whose init is the worker; when it dies the kernel kills everything in
  it, processes that left the process group included.
* ``"readonly-fs"``: a new mount namespace where every mount is read-only except the working directory;
  ``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run`` and the parent's home are hidden under empty tmpfs (no unix
  sockets of other services, no credentials), and ``/proc`` shows only the sandbox's processes.
* ``"no-new-privs"``: ``PR_SET_NO_NEW_PRIVS``, so setuid binaries grant nothing.

``RLIMIT_NPROC`` counts all processes (threads included) of a uid, and root is exempt: it is
``max_processes`` for a sandbox with its own uid (root parent) or user namespace (counted per namespace),
and otherwise the number of tasks the user already runs plus ``max_processes``.

What falls back where. As root without namespaces (no CAP_SYS_ADMIN): the uid drop protects root-owned
files and the parent, the network is guarded in Python only, and the parent also kills every process of
the run's uid. As a plain user without user namespaces (a locked-down CI runner): the worker runs as the
calling user, so the Python guards are what keeps it off the network and off files outside its directory,
and the supervisor and ``killpg`` what reap its processes; a solution that deliberately defeats the guards
could reach what that user can (and, on the same uid, even kill the supervisor first).

Not defended: a solution that makes its own checks pass (an object whose ``__eq__`` is always true), or
that tampers with the harness inside its own process (the nonce lives in that address space). Tests are
statements: one passes when it runs without raising; a bare expression is not checked for truth, so
HumanEval-style ``check(candidate)`` calls work as written.
"""

from __future__ import annotations

import builtins
import contextlib
import marshal
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Sequence

__all__ = ["CodeExecutor", "SandboxResult", "code_exec_reward", "extract_code", "run_python"]

_JOB_FILE = "job"
_RECORD_CAP = 2048  # bytes per result record (below PIPE_BUF, so each write is atomic)
_ERROR_CAP = 300  # characters of SandboxResult.error
_NOFILE = 256


# -------------------------------------------------------------------------------------------- child side
# This file is also the child's harness (run as ``python -I -S -B sandbox.py BASE``). Its side comes first,
# with the script entry point right after it, so that the child does not pay for the parent's imports.
# Order of the work: read the job, set the resource limits, enter namespaces and drop privileges, fork the
# worker under a supervisor, install the guards, run the solution and the tests.

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added after the syscall table unification)
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 0x1, 0x2
_CAP_VERSION_3 = 0x20080522


def _child_main(base: str) -> None:
    job = _load_job(os.path.join(base, _JOB_FILE))
    send = _reporter(job["result_fd"], job["nonce"])
    _set_rlimits(job["limits"])
    layers = _isolate(job)
    if job["guards"]:
        _install_guards(job["work"])
        layers.append("python-guards")
    send("ready", ",".join(layers))
    _run_program(job["code"], job["tests"], send)
    send("done")
    _flush_and_exit(0)


def _load_job(path: str) -> dict:
    with open(path, "rb") as f:
        job = marshal.load(f)
    os.unlink(path)
    return job


def _reporter(fd: int, nonce: str) -> Callable[..., None]:
    """``send(kind, payload)``: one result record, one atomic write to the results pipe."""

    def send(kind: str, payload: str = "") -> None:
        line = f"{nonce} {kind} {payload}".replace("\n", " ")
        try:
            os.write(fd, line.encode("utf-8", "replace")[: _RECORD_CAP - 1] + b"\n")
        except (OSError, MemoryError):
            pass

    return send


def _set_rlimits(limits: dict[str, int]) -> None:
    cpu = limits["cpu_s"]
    for which, soft, hard in (
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
        (resource.RLIMIT_AS, limits["memory_bytes"], limits["memory_bytes"]),
        (resource.RLIMIT_FSIZE, limits["file_bytes"], limits["file_bytes"]),
        (resource.RLIMIT_NOFILE, _NOFILE, _NOFILE),
    ):
        _setrlimit(which, soft, hard)
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")  # the kernel's OOM killer picks the sandbox first


def _setrlimit(which: int, soft: int, hard: int) -> None:
    _, current_hard = resource.getrlimit(which)
    if current_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(which, (soft, hard))


def _isolate(job: dict) -> list[str]:
    """Enter what namespaces the host allows, fork the worker, drop privileges; returns the active layers.

    Returns in the worker only (the supervisor exits from :func:`_fork_supervisor`).
    """
    layers = ["rlimits"]
    _libc()  # loads ctypes while the standard library is surely readable
    root = os.geteuid() == 0
    uid, gid = job["uid"], job["gid"]
    path_fds = _open_import_paths()
    flags = 0
    if job["namespaces"] and root:
        flags = _unshare_first((_CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID, _CLONE_NEWNS | _CLONE_NEWNET))
    dropped = False
    if root and uid is not None and not flags:  # root without CAP_SYS_ADMIN: drop first, try a user namespace
        dropped = _drop_root(uid, gid)
    if job["namespaces"] and not flags and (not root or dropped):
        flags = _enter_user_namespace()
    _fork_supervisor(job["result_fd"], pid_namespace=bool(flags & _CLONE_NEWPID))
    if flags & _CLONE_NEWNS and _mount_sandbox_fs(
        job["work"], job["hide"], new_proc=bool(flags & _CLONE_NEWPID)
    ):
        layers.append("readonly-fs")
    if root and uid is not None and not dropped:
        dropped = _drop_root(uid, gid)
    if dropped:
        layers.append("uid")
    if flags & _CLONE_NEWUSER:
        _drop_capabilities()
        layers.append("userns")
    _reroute_import_paths(path_fds)
    layers += [name for flag, name in ((_CLONE_NEWNET, "netns"), (_CLONE_NEWPID, "pidns")) if flags & flag]
    if _prctl(_PR_SET_NO_NEW_PRIVS, 1) == 0:
        layers.append("no-new-privs")
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # again: a credential change clears it
    _limit_processes(job["limits"]["max_processes"], per_sandbox=dropped or bool(flags & _CLONE_NEWUSER))
    with contextlib.suppress(OSError):  # after the mounts: the cwd inherited is the directory under them
        os.chdir(job["work"])
    return layers


def _libc():  # -> ctypes.CDLL; ctypes is imported in the child only
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> int:
    import ctypes

    zero = ctypes.c_ulong(0)
    return _libc().prctl(ctypes.c_int(option), ctypes.c_ulong(value), zero, zero, zero)


def _unshare_first(candidates: Sequence[int]) -> int:
    """The first set of namespace flags ``unshare`` accepts (0 when none)."""
    libc = _libc()
    for flags in candidates:
        if libc.unshare(flags) == 0:
            return flags
    return 0


def _enter_user_namespace() -> int:
    """Unprivileged path: the namespaces inside a new user namespace where the uid maps to itself."""
    uid, gid = os.getuid(), os.getgid()
    base = _CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWNET
    flags = _unshare_first((base | _CLONE_NEWPID, base, _CLONE_NEWUSER | _CLONE_NEWNET))
    maps = (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1"))
    if flags:
        with contextlib.suppress(OSError):  # unmapped, the uid reads as nobody inside; the rest still holds
            for name, text in maps:
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
    return flags


def _fork_supervisor(result_fd: int, *, pid_namespace: bool) -> None:
    """Fork the worker, which returns from here and runs the rest; this process stays as its supervisor.

    The supervisor is a child subreaper: descendants orphaned by a ``setsid`` or by a dead parent become its
    children, not the host init's. When the worker exits, or on SIGTERM (the parent's stop request, which
    kills the worker), it kills and reaps every descendant left, then exits with the worker's status. With a
    PID namespace the worker is the namespace's init, and its death takes the whole namespace down.
    """
    worker, reaped = 0, False

    def stop(signum: int, _frame: object) -> None:
        if not worker:
            os._exit(128 + signum)
        if not reaped:  # (once reaped, its pid may belong to someone else)
            os.kill(worker, signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    worker = os.fork()
    if worker == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        return
    os.close(result_fd)
    _, status = os.waitpid(worker, 0)
    reaped = True
    if not pid_namespace:  # (with one, the kernel did this, and /proc here would show the namespace's view)
        _kill_descendants()
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def _kill_descendants() -> None:
    """SIGKILL every descendant and reap it, round after round, until this process has no child left."""
    me = os.getpid()
    while True:
        for pid in _descendants(me):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        time.sleep(0.002)


def _descendants(ancestor: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:  # the fields after "pid (comm)", and comm may hold anything
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rpartition(b")")[2].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(name))
    found, frontier = [], [ancestor]
    while frontier:
        kids = children.get(frontier.pop(), [])
        found += kids
        frontier += kids
    return found


def _mount_sandbox_fs(work: str, hide: Sequence[str], *, new_proc: bool) -> bool:
    """In the new mount namespace: everything read-only but ``work``, ``hide`` emptied, a private /proc."""
    try:
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing below may propagate to the host
    except OSError:
        return False
    work_fd = os.open(work, os.O_PATH | os.O_DIRECTORY)
    try:
        for path in hide:
            if os.path.isdir(path) and not os.path.islink(path):
                with contextlib.suppress(OSError):
                    _mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=64k,mode=755")
        if not _same_file(work, work_fd):  # hidden under one of them: make the path again, bind it back
            os.makedirs(work, exist_ok=True)
        _mount(f"/proc/self/fd/{work_fd}", work, None, _MS_BIND | _MS_REC)
        if new_proc:
            with contextlib.suppress(OSError):
                _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
        _mount_setattr("/", _AT_RECURSIVE, set_flags=_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID)
        _mount_setattr(work, 0, clear_flags=_MOUNT_ATTR_RDONLY)
    except OSError:
        return False
    finally:
        os.close(work_fd)
    return True


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    import ctypes

    enc = lambda s: None if s is None else os.fsencode(s)
    if _libc().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _mount_setattr(path: str, at_flags: int, *, set_flags: int = 0, clear_flags: int = 0) -> None:
    import ctypes

    class MountAttr(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns_fd")]

    attr = MountAttr(set_flags, clear_flags, 0, 0)
    args = (
        ctypes.c_long(_SYS_MOUNT_SETATTR),
        ctypes.c_int(_AT_FDCWD),
        os.fsencode(path),
        ctypes.c_uint(at_flags),
    )
    if _libc().syscall(*args, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount_setattr {path}: {os.strerror(err)}")


def _same_file(path: str, fd: int) -> bool:
    try:
        a, b = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _drop_root(uid: int, gid: int) -> bool:
    """setgroups/setgid/setuid to the sandbox user; ``False`` (still root) when the host refuses."""
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError:
        return False
    _prctl(_PR_SET_DUMPABLE, 1)  # a uid change makes /proc/self root-owned; the imports need /proc/self/fd
    return True


def _drop_capabilities() -> None:
    """Empty every capability set (the full one a new user namespace grants), so the mounts stay as set."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]

    _libc().capset(ctypes.byref(Header(_CAP_VERSION_3, 0)), (Data * 2)())


def _open_import_paths() -> dict[str, int]:
    """Handles on the import directories, opened before privileges drop and mounts hide their parents."""
    fds = {}
    for entry in dict.fromkeys(sys.path):
        with contextlib.suppress(OSError):
            fds[entry] = os.open(entry, os.O_PATH | os.O_DIRECTORY)
    return fds


def _reroute_import_paths(fds: dict[str, int]) -> None:
    """Point the import directories the sandbox can no longer reach at their ``/proc/self/fd`` handles.

    A Python installed under a 0700 ``/root`` or under the hidden home stays importable after the drop.
    """
    moves = {}
    for entry, fd in fds.items():
        if os.access(entry, os.R_OK | os.X_OK):
            os.close(fd)
        else:
            moves[entry] = f"/proc/self/fd/{fd}"
    if not moves:
        return

    def move(path: str) -> str:
        for old, new in moves.items():
            if path == old or path.startswith(old + os.sep):
                return new + path[len(old) :]
        return path

    sys.path[:] = [move(p) for p in sys.path]
    for module in list(sys.modules.values()):
        paths = getattr(module, "__path__", None)
        if isinstance(paths, list):
            paths[:] = [move(p) for p in paths]
    sys.path_importer_cache.clear()


def _limit_processes(max_processes: int, *, per_sandbox: bool) -> None:
    """``RLIMIT_NPROC``: per sandbox where its uid or user namespace is its own, else on top of the user's."""
    limit = max_processes if per_sandbox else _count_user_tasks(os.getuid()) + max_processes
    _setrlimit(resource.RLIMIT_NPROC, limit, limit)


def _count_user_tasks(uid: int) -> int:
    total = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{name}").st_uid == uid:
                    total += len(os.listdir(f"/proc/{name}/task"))
    return total


_BLOCKED_EVENTS = frozenset(
    {
        "os.fork",
        "os.forkpty",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.kill",
        "os.killpg",
        "subprocess.Popen",
        "pty.spawn",
        "socket.connect",
        "socket.bind",
        "socket.sendto",
        "socket.sendmsg",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyaddr",
        "socket.getnameinfo",
        "webbrowser.open",
    }
)
# Audit events that modify the file system, and the positions of their path arguments.
_PATH_EVENTS = {
    "os.mkdir": (0,),
    "os.rmdir": (0,),
    "os.remove": (0,),
    "os.rename": (0, 1),
    "os.link": (0, 1),
    "os.symlink": (1,),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.chflags": (0,),
    "os.truncate": (0,),
    "os.utime": (0,),
    "os.setxattr": (0,),
    "os.removexattr": (0,),
    "shutil.rmtree": (0,),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_OPEN_STREAMS = frozenset({"/dev/null", "/dev/stdout", "/dev/stderr"})


def _install_guards(work: str) -> None:
    """An audit hook refusing processes, signals, ctypes, the network, writes outside ``work``, and reads
    of other processes' ``/proc`` entries (the parent's ``environ``, where there is no PID namespace).

    The hook keeps its own references to what it calls, so rebinding ``os.path.realpath`` and the like
    does not switch it off.
    """
    import socket

    root = os.path.realpath(work)
    prefix = root.rstrip(os.sep) + os.sep
    realpath, abspath, fsdecode, own_pid = os.path.realpath, os.path.abspath, os.fsdecode, str(os.getpid())
    af_unix, blocked, path_events, write_flags = socket.AF_UNIX, _BLOCKED_EVENTS, _PATH_EVENTS, _WRITE_FLAGS

    def inside(path: object) -> bool:
        if isinstance(path, int):  # an already open descriptor
            return True
        try:
            name = abspath(fsdecode(path))
            if name in _OPEN_STREAMS or name.startswith(("/dev/fd/", "/proc/self/fd/")):
                return True  # reopens a descriptor the process already holds
            resolved = realpath(name)
        except Exception:
            return False
        return resolved == root or resolved.startswith(prefix)

    def other_process(path: object) -> bool:
        try:
            parts = abspath(fsdecode(path)).split(os.sep)
        except Exception:
            return True
        return len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != own_pid

    def hook(event: str, args: tuple) -> None:
        if event in blocked or event.startswith("ctypes."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, _, flags = args
            if flags & write_flags and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} (outside the working directory)")
            if not isinstance(path, int) and other_process(path):
                raise PermissionError(f"sandbox: reading {path!r} (another process)")
        elif event == "socket.__new__":
            if args[1] != af_unix:
                raise PermissionError("sandbox: network sockets are not allowed")
        elif event in path_events:
            for i in path_events[event]:
                if i < len(args) and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} {args[i]!r} (outside the working directory)")

    sys.addaudithook(hook)


def _run_program(code: str, tests: Sequence[str], send: Callable[..., None]) -> None:
    namespace = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(code, "<solution>", "exec"), namespace)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt included
        namespace.clear()  # frees what a memory bomb holds before reporting
        send("solution", "error " + _describe(exc))
        _print_traceback(code)
        return
    send("solution", "ok")
    for index, test in enumerate(tests):
        try:
            exec(compile(test, f"<test {index}>", "exec"), namespace)
        except BaseException as exc:
            send("test", f"{index} fail {_describe(exc)}")
        else:
            send("test", f"{index} pass")


def _describe(exc: BaseException) -> str:
    try:
        name, text = type(exc).__name__, str(exc)
    except BaseException:  # an exception whose __str__ raises
        name, text = "Exception", ""
    return f"{name}: {text}"[:_ERROR_CAP] if text else name


def _print_traceback(code: str) -> None:
    """The solution's traceback on stderr, with its source lines."""
    with contextlib.suppress(BaseException):
        import linecache
        import traceback

        linecache.cache["<solution>"] = (len(code), None, code.splitlines(True), "<solution>")
        traceback.print_exc()


def _flush_and_exit(status: int) -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(BaseException):
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    _child_main(sys.argv[1])  # never returns: the harness ends with os._exit


# ------------------------------------------------------------------------------------------- parent side
# Imported only here: the child never gets this far, and these imports would double its start-up time.

import math  # noqa: E402
import re  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402

# Toggles for tests of the fallbacks (a run as on a host without namespaces, or the kernel layers alone).
_USE_NAMESPACES = True
_USE_PYTHON_GUARDS = True

_HARNESS = os.path.abspath(__file__)
_STREAM_CAP = 64 * 1024  # bytes of stdout / stderr read back
_RESULTS_CAP = 4 * 1024 * 1024  # bytes of result records the parent reads at most
_REAPER_GRACE_S = 1.0  # after SIGTERM, how long the harness's supervisor gets to kill the worker and exit
_EXIT_GRACE_S = 0.5  # after the harness reported "done", how long the child gets to exit on its own
# Per-run uids when the parent is root: far above the ranges of accounts (< 65536), systemd's dynamic
# users and the usual /etc/subuid container ranges; a clash with another sandbox only shares a process limit.
_SANDBOX_UID_BASE = 1_500_000_000
_SANDBOX_UID_SPAN = 1 << 24
_NOBODY = 65534
_SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of one :func:`run_python` call.

    Attributes:
      passed: one entry per test, ``True`` when it ran and raised nothing.
      timed_out: the wall-clock limit was hit (the process group was killed).
      error: ``None`` when every test passed; else a short reason: ``"timeout"``, ``"memory"``, the
        solution's exception (``"SyntaxError: ..."``), ``"exit code -9: <stderr tail>"``, or the first failing
        test (``"test 2: AssertionError"``).
      wall_s: seconds from the start of the run until the child was reaped.
      isolation: the isolation layers that were active (see the module docstring); empty when the child
        never got as far as reporting them.
      stdout: the child's stdout, at most 64 KiB (its beginning).
      stderr: the child's stderr, at most 64 KiB (its end).
    """

    passed: list[bool]
    timed_out: bool
    error: str | None
    wall_s: float
    isolation: tuple[str, ...] = ()
    stdout: str = ""
    stderr: str = ""

    @property
    def score(self) -> float:
        """Fraction of tests passed (0.0 for a run without tests)."""
        return sum(self.passed) / len(self.passed) if self.passed else 0.0


_FENCE = re.compile(r"^[ \t]*```[ \t]*([^\n`]*)\n(.*?)(?:^[ \t]*```|\Z)", re.DOTALL | re.MULTILINE)
_PYTHON_TAGS = frozenset({"python", "py", "python3", "py3"})


def extract_code(completion: str) -> str:
    """The program in a model's answer.

    The last fenced block tagged ``python``/``py`` (also ``python3``/``py3``; the tag's case and anything
    after it on the fence line are ignored), else the last fenced block of any tag, else the whole text. A
    last block whose closing fence is missing (a truncated answer) runs to the end of the text. The block is
    dedented, so fences indented inside a list item work.
    """
    blocks = [(m.group(1).strip().split(" ")[0].lower(), m.group(2)) for m in _FENCE.finditer(completion)]
    python = [body for tag, body in blocks if tag in _PYTHON_TAGS]
    if python:
        return textwrap.dedent(python[-1])
    if blocks:
        return textwrap.dedent(blocks[-1][1])
    return completion


def run_python(
    code: str,
    tests: Sequence[str] = (),
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_processes: int = 16,
    max_file_mb: int = 16,
    cpu_s: float | None = None,
) -> SandboxResult:
    """Run ``code``, then each snippet of ``tests`` in its namespace, in one fresh contained child process.

    Args:
      code: the program (module level; its ``__name__`` is ``"solution"``, so an
        ``if __name__ == "__main__":`` demo block does not run).
      tests: statements run one by one after the program; each passes when it raises nothing. When the
        program itself raises, no test runs and all fail.
      timeout_s: wall-clock limit for the whole run (interpreter start included, about 0.05 s).
      memory_mb: address-space limit (``RLIMIT_AS``); below about 64 the interpreter may not start.
      max_processes: processes and threads the sandbox may hold (``RLIMIT_NPROC``, see the module docstring).
      max_file_mb: largest file the sandbox may write, its captured stdout/stderr included.
      cpu_s: CPU-seconds limit; by default the timeout rounded up, plus one.

    Raises:
      ValueError: a limit is not positive.
      OSError: not on Linux, or the child could not be started (a problem of the host, not of the code).
    """
    if not sys.platform.startswith("linux"):
        raise OSError(f"run_python: the sandbox needs Linux (prctl, namespaces, /proc), not {sys.platform}")
    limits = _limits(timeout_s, memory_mb, max_processes, max_file_mb, cpu_s)
    return _Run(code, list(tests), limits, timeout_s).execute()


def code_exec_reward(completion: str, tests: list[str], *, timeout_s: float) -> float:
    """Fraction of ``tests`` that the program in ``completion`` (:func:`extract_code`) passes.

    Raises:
      ValueError: ``tests`` is empty: a record without tests cannot be scored (a data error, not a 0 reward).
    """
    _check_tests(tests)
    return run_python(extract_code(completion), tests, timeout_s=timeout_s).score


class CodeExecutor:
    """A pool that runs many sandboxes in parallel (each thread only supervises one child process).

    ``with CodeExecutor(8, timeout_s=2) as ex: scores = ex.map(completions, tests)`` returns one reward per
    completion, in order; ``ex.run(codes, tests)`` returns the :class:`SandboxResult` s of raw programs. A
    timeout in one run does not hold the others back beyond its own limit.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        timeout_s: float = 5.0,
        memory_mb: int = 512,
        max_processes: int = 16,
        max_file_mb: int = 16,
        cpu_s: float | None = None,
    ) -> None:
        _limits(timeout_s, memory_mb, max_processes, max_file_mb, cpu_s)  # validate once, up front
        workers = max_workers if max_workers is not None else os.cpu_count() or 1
        if workers < 1:
            raise ValueError(f"CodeExecutor: max_workers must be >= 1, got {max_workers}")
        self._options = dict(
            timeout_s=timeout_s,
            memory_mb=memory_mb,
            max_processes=max_processes,
            max_file_mb=max_file_mb,
            cpu_s=cpu_s,
        )
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="sandbox")

    def run(self, codes: Sequence[str], tests: Sequence[Sequence[str]]) -> list[SandboxResult]:
        """Run each program against its tests, in parallel; results in the order of ``codes``."""
        if len(codes) != len(tests):
            raise ValueError(f"CodeExecutor: {len(codes)} programs but {len(tests)} test lists")
        futures = [
            self._pool.submit(run_python, c, list(t), **self._options)
            for c, t in zip(codes, tests, strict=True)
        ]
        return [f.result() for f in futures]

    def map(self, completions: Sequence[str], tests: Sequence[list[str]]) -> list[float]:
        """:func:`code_exec_reward` of each completion against its tests, in parallel, in order."""
        for t in tests:
            _check_tests(t)
        return [r.score for r in self.run([extract_code(c) for c in completions], tests)]

    def close(self) -> None:
        """Wait for running sandboxes, drop queued ones, release the threads."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> CodeExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_tests(tests: Sequence[str]) -> None:
    if not tests:
        raise ValueError("code_exec_reward: the test list is empty; a record without tests cannot be scored")


def _limits(
    timeout_s: float, memory_mb: int, max_processes: int, max_file_mb: int, cpu_s: float | None
) -> dict[str, int]:
    named = dict(
        timeout_s=timeout_s, memory_mb=memory_mb, max_processes=max_processes, max_file_mb=max_file_mb
    )
    if cpu_s is not None:
        named["cpu_s"] = cpu_s
    for name, value in named.items():
        if not value > 0:
            raise ValueError(f"run_python: {name} must be > 0, got {value!r}")
    cpu = math.ceil(cpu_s) if cpu_s is not None else math.ceil(timeout_s) + 1
    return {
        "cpu_s": cpu,
        "memory_bytes": int(memory_mb) << 20,
        "file_bytes": int(max_file_mb) << 20,
        "max_processes": int(max_processes),
    }


# ------------------------------------------------------------------------------ parent side, internals


class _Run:
    """One sandboxed execution: a private directory, the child, its supervision and cleanup."""

    def __init__(self, code: str, tests: list[str], limits: dict[str, int], timeout_s: float) -> None:
        self.code, self.tests, self.limits, self.timeout_s = code, tests, limits, timeout_s
        self.nonce = os.urandom(16).hex()
        self.root = os.geteuid() == 0

    def execute(self) -> SandboxResult:
        start = time.monotonic()
        base = tempfile.mkdtemp(prefix="jaxrl-sandbox-")
        try:
            work = os.path.join(base, "work")
            os.mkdir(work, 0o700)
            uid, gid = self._sandbox_user(base, work)
            records = _Records(self.nonce, len(self.tests))
            proc, timed_out = self._spawn_and_supervise(base, work, uid, gid, records, start)
            if uid is not None and "pidns" not in records.layers:
                _kill_user(uid, gid)
            wall = time.monotonic() - start
            stdout = _read_capped(os.path.join(base, "stdout"), tail=False)
            stderr = _read_capped(os.path.join(base, "stderr"), tail=True)
        finally:
            _remove_tree(base)
        return SandboxResult(
            passed=records.passed(),
            timed_out=timed_out,
            error=records.error(timed_out, proc.returncode, stderr),
            wall_s=wall,
            isolation=records.layers,
            stdout=stdout,
            stderr=stderr,
        )

    def _sandbox_user(self, base: str, work: str) -> tuple[int | None, int | None]:
        """As root: a fresh uid owning the working directory (``nobody`` if the fresh one is unmapped)."""
        if not self.root:
            return None, None
        os.chmod(base, 0o711)  # the sandbox user may reach work/ but not list base/ (job, stdout, stderr)
        fresh = _SANDBOX_UID_BASE + int.from_bytes(os.urandom(4), "little") % _SANDBOX_UID_SPAN
        for uid in (fresh, _NOBODY):
            try:
                os.chown(work, uid, uid)
            except OSError:  # a user namespace (rootless container) that does not map this uid
                continue
            return uid, uid
        return None, None

    def _write_job(self, base: str, work: str, write_fd: int, uid: int | None, gid: int | None) -> None:
        job = {
            "nonce": self.nonce,
            "result_fd": write_fd,
            "work": work,
            "code": self.code,
            "tests": self.tests,
            "limits": self.limits,
            "uid": uid,
            "gid": gid,
            "namespaces": _USE_NAMESPACES,
            "guards": _USE_PYTHON_GUARDS,
            "hide": _hidden_dirs(),
        }
        fd = os.open(os.path.join(base, _JOB_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "wb") as f:
            marshal.dump(job, f)

    def _spawn_and_supervise(
        self, base: str, work: str, uid: int | None, gid: int | None, records: _Records, start: float
    ) -> tuple[subprocess.Popen[bytes], bool]:
        read_fd, write_fd = os.pipe()
        try:
            try:
                self._write_job(base, work, write_fd, uid, gid)
                proc = self._spawn(base, work, write_fd)
            finally:
                os.close(write_fd)  # the child holds the only write end now
            try:
                timed_out = _supervise(proc, read_fd, records, start + self.timeout_s)
            finally:
                _stop(proc, records)
            records.drain(read_fd)
        finally:
            os.close(read_fd)
        return proc, timed_out

    def _spawn(self, base: str, work: str, write_fd: int) -> subprocess.Popen[bytes]:
        env = {"PATH": _SANDBOX_PATH, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        with open(os.path.join(base, "stdout"), "wb") as out, open(os.path.join(base, "stderr"), "wb") as err:
            return subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", _HARNESS, base],
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=(write_fd,),
                start_new_session=True,
            )


class _Records:
    """Parses the harness's result records; only lines carrying the run's nonce count."""

    def __init__(self, nonce: str, n_tests: int) -> None:
        self.nonce, self.n_tests = nonce, n_tests
        self.layers: tuple[str, ...] = ()
        self.solution_ran = False
        self.solution_error: str | None = None
        self.results: dict[int, bool] = {}
        self.failures: dict[int, str] = {}
        self.done = False
        self.eof = False
        self._buffer = b""
        self._read = 0

    def feed_from(self, fd: int) -> None:
        """Read what the pipe holds now (non-blocking); marks ``eof`` when all write ends are closed."""
        while self._read < _RESULTS_CAP:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self.eof = True
                return
            self._read += len(chunk)
            *lines, self._buffer = (self._buffer + chunk).split(b"\n")
            for line in lines:
                self._parse(line.decode("utf-8", "replace"))
        self.eof = True  # a flood of junk: stop listening

    def drain(self, fd: int) -> None:
        if not self.eof:
            self.feed_from(fd)

    def _parse(self, line: str) -> None:
        nonce, _, rest = line.partition(" ")
        if nonce != self.nonce:
            return
        kind, _, payload = rest.partition(" ")
        if kind == "ready":
            self.layers = tuple(x for x in payload.split(",") if x)
        elif kind == "solution":
            self.solution_ran = payload == "ok"
            if payload.startswith("error "):
                self.solution_error = payload[len("error ") :]
        elif kind == "test" and self.solution_ran:
            index, _, rest = payload.partition(" ")
            verdict, _, reason = rest.partition(" ")
            if index.isdigit() and int(index) < self.n_tests and int(index) not in self.results:
                self.results[int(index)] = verdict == "pass"
                if verdict != "pass":
                    self.failures[int(index)] = reason
        elif kind == "done":
            self.done = True

    def passed(self) -> list[bool]:
        return [self.results.get(i, False) for i in range(self.n_tests)]

    def error(self, timed_out: bool, returncode: int | None, stderr: str) -> str | None:
        if timed_out:
            return "timeout"
        if self.solution_error is not None:
            return _short_reason(self.solution_error)
        if len(self.results) < self.n_tests or not self.done:
            tail = stderr.strip()[-200:]
            return _clip(f"exit code {returncode}" + (f": {tail}" if tail else ""))
        if self.failures:
            index = min(self.failures)
            return _clip(f"test {index}: {_short_reason(self.failures[index])}")
        return None


def _short_reason(reason: str) -> str:
    return "memory" if reason.startswith("MemoryError") else _clip(reason)


def _clip(text: str) -> str:
    return text if len(text) <= _ERROR_CAP else text[: _ERROR_CAP - 3] + "..."


def _supervise(proc: subprocess.Popen[bytes], read_fd: int, records: _Records, deadline: float) -> bool:
    """Collect records until the harness is done, the child exits, or the deadline (returns True) passes."""
    os.set_blocking(read_fd, False)
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    pidfd = None
    with contextlib.suppress(AttributeError, OSError):  # Linux >= 5.3: wake up the moment the child exits
        pidfd = os.pidfd_open(proc.pid)
        poller.register(pidfd, select.POLLIN)
    try:
        while not records.done and proc.poll() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            wait = remaining if pidfd is not None else min(remaining, 0.02)
            for fd, _ in poller.poll(max(1, int(wait * 1000))):
                if fd == read_fd:
                    records.feed_from(read_fd)
                    if records.eof:
                        poller.unregister(read_fd)
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _stop(proc: subprocess.Popen[bytes], records: _Records) -> None:
    """Make sure nothing of the run survives: the child, its PID namespace, its process group."""
    if records.done and proc.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(_EXIT_GRACE_S)
    if proc.poll() is None:
        # The harness's supervisor kills the worker and whatever it left (with a PID namespace: its init,
        # which takes the namespace along) and reaps them, so no zombie is left to the host's init.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(_REAPER_GRACE_S)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _kill_user(uid: int, gid: int | None) -> None:
    """Kill every process of the sandbox's own uid (``kill -KILL -1`` run as that uid).

    Reaches processes that left the process group with ``setsid`` when there is no PID namespace. Only for
    a fresh per-run uid: ``nobody`` may be shared with other services.
    """
    kill = shutil.which("kill", path=_SANDBOX_PATH)
    if uid == _NOBODY or kill is None:
        return
    with contextlib.suppress(OSError):
        subprocess.run(
            [kill, "-KILL", "-1"],
            user=uid,
            group=gid,
            extra_groups=[],
            env={},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
            timeout=5,
        )


def _hidden_dirs() -> list[str]:
    """Directories the sandbox sees as empty (where it has a mount namespace)."""
    dirs = ["/tmp", "/var/tmp", "/dev/shm", "/run", tempfile.gettempdir()]
    home = os.path.expanduser("~")
    if home not in ("/", "") and os.path.isabs(home):
        dirs.append(home)
    return list(dict.fromkeys(os.path.realpath(d) for d in dirs))


def _read_capped(path: str, *, tail: bool) -> str:
    try:
        with open(path, "rb") as f:
            if tail:
                f.seek(max(0, os.fstat(f.fileno()).st_size - _STREAM_CAP))
            data = f.read(_STREAM_CAP)
    except OSError:
        return ""
    return data.decode("utf-8", "replace")


def _remove_tree(path: str) -> None:
    """``rmtree`` that also removes what the sandbox made unreadable (``chmod 000`` directories)."""

    def make_writable_and_retry(func: Callable[..., object], target: str, _: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target), stat.S_IRWXU)
            if os.path.isdir(target) and not os.path.islink(target):
                os.chmod(target, stat.S_IRWXU)
                shutil.rmtree(target, ignore_errors=True)
            else:
                func(target)

    shutil.rmtree(path, onerror=make_writable_and_retry)
