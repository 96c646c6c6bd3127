"""Run model-written Python in a contained child process, and score it against test snippets.

``run_python(code, tests)`` runs ``code`` in a fresh sandboxed process (the *worker*) and each test snippet
(``"assert add(2, 3) == 5"``) in a second one (the *judge*), which calls into the program across a pipe and
decides each verdict itself, so nothing the program does in its own process can report a test passed; it
returns a :class:`SandboxResult` (which tests passed, whether it timed out, a short error).
``code_exec_reward(completion, tests, timeout_s=...)`` is the reward: the fraction of tests passed by the
program in a model's answer (:func:`extract_code`). :class:`CodeExecutor` runs many in parallel.

This module is the parent side: it writes the two jobs, starts both (``sandbox_child.py``, the harness run
as a script), reads the judge's result records, enforces the timeout and cleans up. How verdicts are made,
what each isolation layer does, which ones depend on the host (namespaces, root), and the residual risk:
docs/sandbox.md.
"""

from __future__ import annotations

import contextlib
import marshal
import math
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import sandbox_child
from .sandbox_child import JOB_FILE

__all__ = ["CodeExecutor", "SandboxResult", "code_exec_reward", "extract_code", "run_python"]

# Toggles for tests of the fallbacks (a run as on a host without namespaces, or the kernel layers alone).
_USE_NAMESPACES = True
_USE_PYTHON_GUARDS = True
_USE_PRIVATE_ROOT = True  # off: the fallback's view (the host's tree, read-only, with directories emptied)

_HARNESS = os.path.abspath(sandbox_child.__file__)  # the child's harness, run as a script
_PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(_HARNESS)))  # the checkout (or site-packages)
_ERROR_CAP = 300  # characters of SandboxResult.error; passed in the job, the harness clips reasons to it
_STREAM_CAP = 64 * 1024  # bytes of stdout / stderr read back
_RESULTS_CAP = 4 * 1024 * 1024  # bytes of result records the parent reads at most
_REAPER_GRACE_S = 1.0  # after SIGTERM, how long the harness's supervisor gets to kill the worker and exit
_EXIT_GRACE_S = 0.5  # after the judge reported "done", how long each process gets to exit on its own
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
      passed: one entry per test, ``True`` when it ran in the judge and raised nothing.
      timed_out: the wall-clock limit was hit (the process group was killed).
      error: ``None`` when every test passed; else a short reason: ``"timeout"``, ``"memory"``, the
        solution's exception (``"SyntaxError: ..."``), ``"exit code -9: <stderr tail>"``, or the first failing
        test (``"test 2: AssertionError"``).
      wall_s: seconds from the start of the run until the child was reaped.
      isolation: the isolation layers that were active around the program (see docs/sandbox.md), and
        ``"separate-judge"`` when the verdicts came from the judge process; empty when the worker never
        got as far as reporting them.
      stdout: the program's (and the tests') stdout, at most 64 KiB (its beginning).
      stderr: their stderr, at most 64 KiB (its end).
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
    """Run ``code`` in one fresh contained process, and each snippet of ``tests`` against it in another.

    The tests see the program's names (functions, classes, constants; a standard-library module it imported
    is imported by the judge instead), but builtins always mean the judge's own. Values cross between the
    two processes as plain data (numbers, strings, bytes, lists, tuples, dicts, sets); any other object the
    program returns stays in the worker, and the test holds a handle that forwards calls, attributes, items,
    iteration, ``len``, ``bool``, ``str``, ``int`` and ``float``, and equals only itself.

    Args:
      code: the program (module level; its ``__name__`` is ``"solution"``, so an
        ``if __name__ == "__main__":`` demo block does not run).
      tests: statements run one by one, in one namespace, after the program loaded; each passes when it
        raises nothing. When the program itself raises, no test runs and all fail; when its process ends,
        the test running then and those after it fail.
      timeout_s: wall-clock limit for the whole run (the two interpreters' start included, about 0.1 s).
      memory_mb: address-space limit (``RLIMIT_AS``); below about 64 the interpreter may not start.
      max_processes: processes and threads each sandboxed process may hold (``RLIMIT_NPROC``, see
        docs/sandbox.md).
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
    """One sandboxed execution: a private directory, the judge and the worker, their supervision, cleanup."""

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
            os.mkdir(os.path.join(base, "root"), 0o700)  # where each process builds its private root
            uid, gid = self._sandbox_user(base, work)
            records = _Records(self.nonce, len(self.tests))
            (judge, worker), timed_out = self._spawn_and_supervise(base, work, uid, gid, records, start)
            if uid is not None and not {"pidns"} <= set(records.layers) & set(records.judge_layers):
                _kill_user(uid, gid)
            wall = time.monotonic() - start
            stdout = _read_capped(os.path.join(base, "stdout"), tail=False)
            stderr = _read_capped(os.path.join(base, "stderr"), tail=True)
        finally:
            _remove_tree(base)
        judged = ("separate-judge",) if records.layers and records.judge_layers else ()
        return SandboxResult(
            passed=records.passed(),
            timed_out=timed_out,
            error=records.error(timed_out, worker.returncode, judge.returncode, stderr),
            wall_s=wall,
            isolation=records.layers + judged,
            stdout=stdout,
            stderr=stderr,
        )

    def _sandbox_user(self, base: str, work: str) -> tuple[int | None, int | None]:
        """As root: a fresh uid owning the working directory (``nobody`` if the fresh one is unmapped)."""
        if not self.root:
            return None, None
        os.chmod(base, 0o711)  # the sandbox user may reach work/ but not list base/ (jobs, stdout, stderr)
        fresh = _SANDBOX_UID_BASE + int.from_bytes(os.urandom(4), "little") % _SANDBOX_UID_SPAN
        for uid in (fresh, _NOBODY):
            try:
                os.chown(work, uid, uid)
            except OSError:  # a user namespace (rootless container) that does not map this uid
                continue
            return uid, uid
        return None, None

    def _write_job(self, base: str, role: str, job: dict) -> None:
        fd = os.open(os.path.join(base, f"{role}.{JOB_FILE}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "wb") as f:
            marshal.dump(job, f)

    def _spawn_and_supervise(
        self, base: str, work: str, uid: int | None, gid: int | None, records: _Records, start: float
    ) -> tuple[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]], bool]:
        common = {
            "work": work,
            "root": os.path.join(base, "root"),
            "limits": self.limits,
            "uid": uid,
            "gid": gid,
            "namespaces": _USE_NAMESPACES,
            "guards": _USE_PYTHON_GUARDS,
            "private_root": _USE_PRIVATE_ROOT,
            "hide": _hidden_dirs(),
            "error_cap": _ERROR_CAP,
        }
        # Three pipes: the judge's records to this process, and the judge <-> worker conversation. The
        # worker holds only its two ends of the conversation: nothing it writes reaches the records.
        results_read, results_write = os.pipe()
        to_worker_read, to_worker_write = os.pipe()
        to_judge_read, to_judge_write = os.pipe()
        judge_fds = (results_write, to_judge_read, to_worker_write)
        worker_fds = (to_worker_read, to_judge_write)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            try:
                judge_job = {"nonce": self.nonce, "result_fd": results_write, "tests": self.tests}
                judge_job |= {"rpc_read": to_judge_read, "rpc_write": to_worker_write}
                self._write_job(base, "judge", common | judge_job)
                worker_job = {"code": self.code, "rpc_read": to_worker_read, "rpc_write": to_judge_write}
                self._write_job(base, "worker", common | worker_job)
                with _output_files(base) as (out, err):
                    procs.append(_spawn(base, work, "judge", judge_fds, out, err))
                    procs.append(_spawn(base, work, "worker", worker_fds, out, err))
            finally:
                for fd in judge_fds + worker_fds:
                    os.close(fd)  # the children hold the only copies now
            try:
                timed_out = _supervise(procs[0], results_read, records, start + self.timeout_s)
            finally:
                _stop(procs, records)
            records.drain(results_read)
        finally:
            os.close(results_read)
            if len(procs) == 1:  # the worker failed to start
                _stop(procs, records)
        return (procs[0], procs[1]), timed_out


@contextlib.contextmanager
def _output_files(base: str):  # -> Iterator[tuple[BinaryIO, BinaryIO]]
    """stdout and stderr, shared by the judge and the worker (append mode: neither overwrites the other)."""
    with open(os.path.join(base, "stdout"), "ab") as out, open(os.path.join(base, "stderr"), "ab") as err:
        yield out, err


def _spawn(base: str, work: str, role: str, fds: Sequence[int], out: object, err: object) -> subprocess.Popen:
    env = {"PATH": _SANDBOX_PATH, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-B", _HARNESS, base, role],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=err,
        pass_fds=tuple(fds),
        start_new_session=True,
    )


class _Records:
    """Parses the judge's result records; only lines carrying the run's nonce count."""

    def __init__(self, nonce: str, n_tests: int) -> None:
        self.nonce, self.n_tests = nonce, n_tests
        self.layers: tuple[str, ...] = ()  # the worker's, reported before the program ran
        self.judge_layers: tuple[str, ...] = ()
        self.solution_ran = False
        self.solution_exited = False
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
        if kind in ("ready", "worker"):
            layers = tuple(x for x in payload.split(",") if x)
            if kind == "ready":
                self.judge_layers = layers
            else:
                self.layers = layers
        elif kind == "solution":
            self.solution_ran = payload == "ok"
            self.solution_exited = payload == "exited"
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

    def error(
        self, timed_out: bool, worker_code: int | None, judge_code: int | None, stderr: str
    ) -> str | None:
        if timed_out:
            return "timeout"
        if self.solution_error is not None:
            return _short_reason(self.solution_error)
        tail = stderr.strip()[-200:]
        if not self.done:
            return _clip(f"judge exit code {judge_code}" + (f": {tail}" if tail else ""))
        if self.solution_exited or len(self.results) < self.n_tests:
            return _clip(f"exit code {worker_code}" + (f": {tail}" if tail else ""))
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


def _stop(procs: Sequence[subprocess.Popen[bytes]], records: _Records) -> None:
    """Make sure nothing of the run survives: the processes, their PID namespaces, their process groups.

    After the judge's "done" it exits on its own, and the worker, seeing its end of the conversation
    close, too (a grace period each); whatever is still running then is stopped.
    """
    if records.done:
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(_EXIT_GRACE_S)
    for proc in procs:
        if proc.poll() is None:
            # The harness's supervisor kills the process it watches and whatever that left (with a PID
            # namespace: its init, which takes the namespace along) and reaps them, so no zombie is left.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _REAPER_GRACE_S
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
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
    """Directories the sandbox sees as empty, where it has a mount namespace but no private root."""
    dirs = ["/tmp", "/var/tmp", "/dev/shm", "/run", tempfile.gettempdir()]
    home = os.path.expanduser("~")
    if home not in ("/", "") and os.path.isabs(home):
        dirs.append(home)  # (an interpreter installed there stays importable: docs/sandbox.md)
    stdlib = os.path.realpath(os.path.dirname(os.__file__))
    extras = ["/etc", _PROJECT, sys.prefix]
    with contextlib.suppress(OSError):  # (a deleted working directory)
        extras.append(os.getcwd())
    for extra in extras:  # unless the standard library is inside
        real = os.path.realpath(extra)
        if real != "/" and not (stdlib + "/").startswith(real.rstrip("/") + "/"):
            dirs.append(real)
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
