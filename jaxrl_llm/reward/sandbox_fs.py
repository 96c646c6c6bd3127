"""What the sandbox's processes see of the file system: a private root, or the host's made read-only.

Runs in the harness (``sandbox_child.py``) inside its new mount namespace, before privileges drop. The
private root is a fresh tmpfs holding only what a Python program needs (the system's programs and
libraries, the interpreter's import directories, a few devices, ``/proc``) and the run's working
directory: ``/etc``, ``/home``, ``/root``, ``/tmp``, ``/work``, the project and its virtual environment are
not there at all. Where the host refuses that, the fallback empties a list of directories with tmpfs
mounts instead. Standard library only. Design: docs/sandbox.md.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_MS_MOVE, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x2000, 0x1000, 0x4000, 0x40000
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added after the syscall table unification)
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 0x1, 0x2

# What the private root holds of the host, besides the interpreter's import directories.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_SYSTEM_FILES = ("/etc/ld.so.cache",)  # the dynamic loader's index, for extension modules' libraries
_DEVICES = ("null", "zero", "full", "random", "urandom")


def libc():  # -> ctypes.CDLL; ctypes is imported in the harness only
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def import_dirs() -> list[str]:
    """The real paths of the interpreter's import directories (the standard library, lib-dynload)."""
    return list(dict.fromkeys(os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)))


def private_root(work: str, staging: str, *, new_proc: bool) -> bool:
    """Make a fresh root in ``staging`` and switch to it; ``False`` (nothing switched) when refused.

    Everything in it is read-only but ``work``. ``/proc`` is a new one where the PID namespace is new
    (only the sandbox's processes), else the host's.
    """
    try:
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing below may propagate to the host
        _mount("tmpfs", staging, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=755")
        _populate(staging, work, new_proc=new_proc)
    except OSError:
        return False
    os.chdir(staging)  # past this point a failure is fatal: the harness dies and the run fails
    _mount(".", "/", None, _MS_MOVE)
    os.chroot(".")
    os.chdir("/")
    _mount_setattr("/", _AT_RECURSIVE, set_flags=_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID)
    _mount_setattr(work, 0, clear_flags=_MOUNT_ATTR_RDONLY)
    return True


def _populate(staging: str, work: str, *, new_proc: bool) -> None:
    kept: list[str] = []  # never create anything below these: they are the host's own directories
    for path in sorted(set(_SYSTEM_DIRS) | set(import_dirs())):  # a parent before its children
        if any(path == k or path.startswith(k + "/") for k in kept):
            continue
        target = staging + path
        if os.path.islink(path):  # /lib -> usr/lib on a merged-/usr system
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(path), target)
        elif os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
            _mount(path, target, None, _MS_BIND | _MS_REC)
        else:
            continue
        kept.append(path)
    for path in _SYSTEM_FILES:
        if os.path.isfile(path) and not any(path.startswith(k + "/") for k in kept):
            _bind_file(path, staging + path)
    for name in _DEVICES:
        _bind_file(f"/dev/{name}", f"{staging}/dev/{name}")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "0"), ("stdout", "1"), ("stderr", "2")):
        os.symlink(target if name == "fd" else f"/proc/self/fd/{target}", f"{staging}/dev/{name}")
    os.makedirs(f"{staging}/tmp")
    os.makedirs(staging + work, exist_ok=True)
    _mount(work, staging + work, None, _MS_BIND | _MS_REC)
    os.makedirs(f"{staging}/proc")
    try:
        if not new_proc:
            raise OSError("no PID namespace of its own")
        _mount("proc", f"{staging}/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    except OSError:  # the host's /proc (a locked-down container may refuse a new one)
        _mount("/proc", f"{staging}/proc", None, _MS_BIND | _MS_REC)


def _bind_file(source: str, target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "w"):
        pass
    _mount(source, target, None, _MS_BIND)


def hide_dirs(work: str, hide: Sequence[str], *, new_proc: bool) -> bool:
    """The fallback: everything read-only but ``work``, ``hide`` emptied with tmpfs, a private /proc."""
    try:
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
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

    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    if libc().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
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
    if libc().syscall(*args, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount_setattr {path}: {os.strerror(err)}")


def _same_file(path: str, fd: int) -> bool:
    try:
        a, b = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def open_import_paths() -> dict[str, int]:
    """Handles on the import directories, opened before privileges drop and mounts hide their parents."""
    fds = {}
    for entry in dict.fromkeys(sys.path):
        with contextlib.suppress(OSError):
            fds[entry] = os.open(entry, os.O_PATH | os.O_DIRECTORY)
    return fds


def reroute_import_paths(fds: dict[str, int]) -> None:
    """Point the import directories the sandbox can no longer reach at their ``/proc/self/fd`` handles.

    A Python installed under a 0700 ``/root`` or under a hidden home stays importable after the drop.
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
