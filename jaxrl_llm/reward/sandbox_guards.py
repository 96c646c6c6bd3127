"""The sandbox's Python-level guards: an audit hook installed by the harness before the program runs.

Defence in depth, and the fallback where the host has no namespaces: code in the same interpreter can get
around an audit hook (through ``gc`` or frame introspection, say), so no verdict depends on it. Standard
library only (imported by the harness, ``sandbox_child.py``). Design: docs/sandbox.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

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
_WRITE_EVENTS = {
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
_LIST_EVENTS = frozenset({"os.listdir", "os.scandir"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_STREAMS = frozenset({"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/dev/stdin", "/dev/stdout"})
_STREAMS |= {"/dev/stderr"}
_HELD = ("/dev/fd/", "/proc/self/")  # the process's own descriptors and /proc entry
_READABLE = ("/usr/share/zoneinfo",)


def install(work: str, import_dirs: Sequence[str]) -> None:
    """Refuse processes, signals, ctypes, the network, writes outside ``work``, reads and listings outside
    ``work`` and ``import_dirs``, and other processes' ``/proc`` entries (where there is no PID namespace).

    The hook keeps its own references to what it calls, so rebinding ``os.path.realpath`` and the like
    does not switch it off.
    """
    import socket
    import sys

    root = os.path.realpath(work)
    writable = (root,)
    readable = (root, *import_dirs, *_READABLE)
    realpath, abspath, fsdecode, own_pid = os.path.realpath, os.path.abspath, os.fsdecode, str(os.getpid())
    af_unix, blocked, write_events, write_flags = socket.AF_UNIX, _BLOCKED_EVENTS, _WRITE_EVENTS, _WRITE_FLAGS
    list_events, streams, held = _LIST_EVENTS, _STREAMS, _HELD

    def under(path: object, roots: tuple[str, ...]) -> bool:
        if isinstance(path, int):  # an already open descriptor
            return True
        try:
            name = abspath(fsdecode(path))
            if name in streams or name.startswith(held):
                return True
            resolved = realpath(name)
        except Exception:
            return False
        return any(resolved == r or resolved.startswith(r.rstrip("/") + "/") for r in roots)

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
            if not isinstance(path, int) and other_process(path):
                raise PermissionError(f"sandbox: reading {path!r} (another process)")
            if not under(path, writable if flags & write_flags else readable):
                raise PermissionError(f"sandbox: opening {path!r} (outside the working directory)")
        elif event == "socket.__new__":
            if args[1] != af_unix:
                raise PermissionError("sandbox: network sockets are not allowed")
        elif event in write_events:
            for i in write_events[event]:
                if i < len(args) and not under(args[i], writable):
                    raise PermissionError(f"sandbox: {event} {args[i]!r} (outside the working directory)")
        elif event in list_events and not under(args[0] if args and args[0] is not None else ".", readable):
            raise PermissionError(f"sandbox: listing {args[0]!r} (outside the working directory)")

    sys.addaudithook(hook)
