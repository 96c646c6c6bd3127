"""The child side of the code sandbox: the harness that runs inside each of a run's two sandboxed processes.

``jaxrl_llm.reward.sandbox`` runs this file as a script twice per run (``python -I -S -B sandbox_child.py
BASE ROLE``): once as the *worker*, which runs the untrusted program, and once as the *judge*, which runs
the tests against it (``sandbox_judge``) and reports the verdicts on a pipe only it holds. Each reads its job
from ``BASE/ROLE.job``, sets the resource limits, enters namespaces (its own: the two cannot see each other)
and drops privileges, forks under a supervisor and installs the guards. The worker then waits for the
judge's go-ahead before it runs the program, so no untrusted code runs before the judge has read its job
and made itself unreadable. Under ``-I`` the harness cannot import its package, and it should not: the
parent's imports would double its start-up time. So: the standard library only, its sibling modules
``sandbox_fs``, ``sandbox_guards``, ``sandbox_judge``, ``sandbox_wire``, and what it needs from the parent
comes in the job file. The design (protocol, isolation layers, fallbacks): docs/sandbox.md.
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

if __name__ == "__main__":  # run as a script: the siblings are top-level modules
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import sandbox_fs
    import sandbox_guards
    import sandbox_judge
    import sandbox_wire

    del sys.path[0]
else:
    from . import sandbox_fs, sandbox_guards, sandbox_judge, sandbox_wire

JOB_FILE = "job"  # BASE/ROLE.job: the parent writes it there, the harness reads and deletes it
_RECORD_CAP = 2048  # bytes per result record (below PIPE_BUF, so each write is atomic)
_NOFILE = 256

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
_CAP_VERSION_3 = 0x20080522


def _child_main(base: str, role: str) -> None:
    judge = role == "judge"
    job = _load_job(os.path.join(base, f"{role}.{JOB_FILE}"))
    channel = sandbox_wire.Channel(job["rpc_read"], job["rpc_write"])
    _set_rlimits(job["limits"])
    import_dirs = sandbox_fs.import_dirs()
    layers = _isolate(job, judge=judge)
    if job["guards"]:
        sandbox_guards.install(job["work"], import_dirs)
        layers.append("python-guards")
    describe = lambda exc: _describe(exc, job["error_cap"])  # noqa: E731
    if judge:
        send = _reporter(job["result_fd"], job["nonce"])
        send("ready", ",".join(layers))
        sandbox_judge.judge(channel, job["tests"], send, describe, job["error_cap"])
        send("done")
    else:
        _run_program(job["code"], channel, layers, describe)
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


def _isolate(job: dict, *, judge: bool) -> list[str]:
    """Enter what namespaces the host allows, fork under a supervisor, drop privileges; returns the layers.

    Returns in the supervised process only (the supervisor exits from :func:`_fork_supervisor`). The judge
    ends non-dumpable: a process of the same uid cannot read its memory (the tests) or its descriptors.
    """
    layers = ["rlimits"]
    sandbox_fs.libc()  # loads ctypes while the standard library is surely readable
    root = os.geteuid() == 0
    uid, gid = job["uid"], job["gid"]
    path_fds = sandbox_fs.open_import_paths()
    flags = 0
    if job["namespaces"] and root:
        flags = _unshare_first((_CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID, _CLONE_NEWNS | _CLONE_NEWNET))
    dropped = False
    if root and uid is not None and not flags:  # root without CAP_SYS_ADMIN: drop first, try a user namespace
        dropped = _drop_root(uid, gid)
    if job["namespaces"] and not flags and (not root or dropped):
        flags = _enter_user_namespace()
    inherited = [job["rpc_read"], job["rpc_write"]] + ([job["result_fd"]] if judge else [])
    _fork_supervisor(inherited, pid_namespace=bool(flags & _CLONE_NEWPID), dumpable=not judge)
    if flags & _CLONE_NEWNS:
        new_proc = bool(flags & _CLONE_NEWPID)
        if job["private_root"] and sandbox_fs.private_root(job["work"], job["root"], new_proc=new_proc):
            layers.append("private-root")
        elif sandbox_fs.hide_dirs(job["work"], job["hide"], new_proc=new_proc):
            layers.append("readonly-fs")
    if root and uid is not None and not dropped:
        dropped = _drop_root(uid, gid)
    if dropped:
        layers.append("uid")
    if flags & _CLONE_NEWUSER:
        _drop_capabilities()
        layers.append("userns")
    sandbox_fs.reroute_import_paths(path_fds)
    layers += [name for flag, name in ((_CLONE_NEWNET, "netns"), (_CLONE_NEWPID, "pidns")) if flags & flag]
    if _prctl(_PR_SET_NO_NEW_PRIVS, 1) == 0:
        layers.append("no-new-privs")
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # again: a credential change clears it
    _prctl(_PR_SET_DUMPABLE, 0 if judge else 1)  # (a uid change makes /proc/self root-owned otherwise)
    _limit_processes(job["limits"]["max_processes"], per_sandbox=dropped or bool(flags & _CLONE_NEWUSER))
    with contextlib.suppress(OSError):  # after the mounts: the cwd inherited is the directory under them
        os.chdir(job["work"])
    return layers


def _prctl(option: int, value: int) -> int:
    import ctypes

    zero = ctypes.c_ulong(0)
    return sandbox_fs.libc().prctl(ctypes.c_int(option), ctypes.c_ulong(value), zero, zero, zero)


def _unshare_first(candidates: Sequence[int]) -> int:
    """The first set of namespace flags ``unshare`` accepts (0 when none)."""
    libc = sandbox_fs.libc()
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


def _fork_supervisor(inherited: Sequence[int], *, pid_namespace: bool, dumpable: bool) -> None:
    """Fork the process that does the work (here called the worker, in the judge's harness too), which
    returns from here and runs the rest; this process stays as its supervisor.

    The supervisor is a child subreaper: descendants orphaned by a ``setsid`` or by a dead parent become its
    children, not the host init's. When the worker exits, or on SIGTERM (the parent's stop request, which
    kills the worker), it kills and reaps every descendant left, then exits with the worker's status. With a
    PID namespace the worker is the namespace's init, and its death takes the whole namespace down. The
    ``inherited`` pipe ends are closed here, so that a side sees end-of-file when the other's worker ends.
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
    for fd in inherited:  # the pipes' ends: only the supervised process holds them
        os.close(fd)
    if not dumpable:
        _prctl(_PR_SET_DUMPABLE, 0)  # it read the job too
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


def _drop_root(uid: int, gid: int) -> bool:
    """setgroups/setgid/setuid to the sandbox user; ``False`` (still root) when the host refuses."""
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError:
        return False
    return True


def _drop_capabilities() -> None:
    """Empty every capability set (the full one a new user namespace grants), so the mounts stay as set."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]

    sandbox_fs.libc().capset(ctypes.byref(Header(_CAP_VERSION_3, 0)), (Data * 2)())


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


def _run_program(code: str, channel: sandbox_wire.Channel, layers: list[str], describe: Callable) -> None:
    """The worker: report the layers, wait for the judge's go-ahead, run the program, answer the judge."""
    try:
        channel.send({"layers": layers})
        if channel.recv().get("op") != "load":
            return
    except sandbox_wire.ChannelClosed:
        return
    namespace = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(code, "<solution>", "exec"), namespace)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt included
        namespace.clear()  # frees what a memory bomb holds before reporting
        with contextlib.suppress(sandbox_wire.ChannelClosed, ValueError):
            channel.send({"error": describe(exc)})
        _print_traceback(code)
        return
    with contextlib.suppress(sandbox_wire.ChannelClosed):
        channel.send({"ok": True})
        sandbox_wire.serve(channel, namespace, describe)


def _describe(exc: BaseException, cap: int) -> str:
    try:
        name, text = type(exc).__name__, str(exc)
    except BaseException:  # an exception whose __str__ raises
        name, text = "Exception", ""
    return f"{name}: {text}"[:cap] if text else name


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
    _child_main(sys.argv[1], sys.argv[2])  # never returns: the harness ends with os._exit
