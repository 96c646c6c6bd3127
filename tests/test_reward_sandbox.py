"""The code-execution sandbox and reward: scoring, forged verdicts, and containment of hostile programs.

Containment and forgery tests run in up to four modes: the default (every layer the host allows), without
namespaces (as on a CI runner that has none), without the Python guards (the kernel layers alone), and
without the private root (the fallback view of the file system). A mode that lacks the layer a test needs on
this host is skipped, so the file passes on any Linux machine, root or not. Every known way for a program
to forge a pass is a test here that must score 0.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest

from jaxrl_llm.reward import sandbox, sandbox_wire
from jaxrl_llm.reward.sandbox import CodeExecutor, SandboxResult, code_exec_reward, extract_code, run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

SLACK_S = 2.0  # start-up and cleanup on a loaded 2-core runner; a run itself takes ~0.05 s

ADD = "def add(a, b):\n    return a + b\n"
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ["default", "no-namespaces", "no-guards", "no-private-root"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(sandbox, "_USE_NAMESPACES", request.param != "no-namespaces")
    monkeypatch.setattr(sandbox, "_USE_PYTHON_GUARDS", request.param != "no-guards")
    monkeypatch.setattr(sandbox, "_USE_PRIVATE_ROOT", request.param != "no-private-root")
    return request.param


@pytest.fixture(params=[*MODES, "no-namespaces-no-guards"])
def any_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The modes, and the barest one: no namespaces and no guards (on a root host, the uid drop alone)."""
    monkeypatch.setattr(sandbox, "_USE_NAMESPACES", "no-namespaces" not in request.param)
    monkeypatch.setattr(sandbox, "_USE_PYTHON_GUARDS", "no-guards" not in request.param)
    monkeypatch.setattr(sandbox, "_USE_PRIVATE_ROOT", request.param != "no-private-root")
    return request.param


@pytest.fixture(autouse=True)
def _no_harness_left_behind():
    yield
    leftovers = [pid for pid in _descendants(os.getpid()) if sandbox._HARNESS in _cmdline(pid)]
    assert leftovers == [], "sandbox processes outlived their run"


def _proc_entries() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    return _read(f"/proc/{pid}/cmdline").replace("\0", " ")


def _descendants(ancestor: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid in _proc_entries():
        fields = _read(f"/proc/{pid}/stat").rpartition(")")[2].split()
        if fields:
            children.setdefault(int(fields[1]), []).append(pid)
    found, frontier = [], [ancestor]
    while frontier:
        kids = children.get(frontier.pop(), [])
        found += kids
        frontier += kids
    return found


def _processes_named(comm: str) -> list[int]:
    return [pid for pid in _proc_entries() if _read(f"/proc/{pid}/comm").strip() == comm]


# ------------------------------------------------------------------------------------------------ scoring


def test_extract_code_picks_the_last_python_block():
    answer = "First:\n```python\nx = 1\n```\nthen\n```\nplain\n```\nand\n```py\nx = 2\n```\nDone."
    assert extract_code(answer) == "x = 2\n"
    assert extract_code("```text\nnot python\n```\n```bash\nls\n```") == "ls\n"
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"
    assert extract_code("Sure:\n```Python3\ny = 3\n") == "y = 3\n"  # a truncated answer: no closing fence
    assert extract_code("1. code:\n   ```python\n   z = 4\n   ```\n") == "z = 4\n"


def test_correct_code_scores_one():
    completion = f"Here you go:\n```python\n{ADD}```"
    tests = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]
    assert code_exec_reward(completion, tests, timeout_s=5) == 1.0
    result = run_python(ADD + "import fractions\n", tests)  # an import after the privileges dropped
    assert result.passed == [True, True] and result.error is None and not result.timed_out
    assert "rlimits" in result.isolation and "python-guards" in result.isolation


def test_partially_correct_code_scores_the_fraction():
    code = "def add(a, b):\n    return a + b if a >= 0 else 0\n"
    tests = ["assert add(2, 3) == 5", "assert add(0, 1) == 1", "assert add(-1, -1) == -2"]
    result = run_python(code, tests)
    assert result.passed == [True, True, False]
    assert result.score == pytest.approx(2 / 3)
    assert result.error == "test 2: AssertionError"
    assert code_exec_reward(f"```python\n{code}```", tests, timeout_s=5) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("def add(a, b)\n    return a + b\n", "SyntaxError"),
        (ADD + "raise RuntimeError('boom')\n", "RuntimeError: boom"),
        (ADD + "import sys\nsys.exit(0)\n", "SystemExit: 0"),
    ],
    ids=["syntax-error", "raises-at-import", "sys-exit"],
)
def test_code_that_fails_to_load_scores_zero(code: str, error: str):
    result = run_python(code, ["assert add(2, 3) == 5"])
    assert result.passed == [False] and result.score == 0.0
    assert result.error is not None and result.error.startswith(error)
    assert "Traceback" in result.stderr


def test_demo_main_block_does_not_run():
    code = ADD + "if __name__ == '__main__':\n    print(add(int(input()), 1))\n"
    assert run_python(code, ["assert add(1, 1) == 2"]).passed == [True]


def test_empty_test_list_and_bad_limits_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        code_exec_reward(ADD, [], timeout_s=1)
    with pytest.raises(ValueError, match="timeout_s"):
        run_python(ADD, ["pass"], timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_python(ADD, ["pass"], memory_mb=-1)


# ----------------------------------------------------------------------------------- runaway programs


def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", ["assert True"], timeout_s=1.0)
    assert time.monotonic() - start < 1.0 + SLACK_S
    assert result.passed == [False] and result.timed_out and result.error == "timeout"


def test_slow_test_after_fast_ones_keeps_their_results():
    tests = ["assert add(1, 2) == 3", "while True: pass", "assert add(0, 0) == 0"]
    result = run_python(ADD, tests, timeout_s=1.0)
    assert result.passed == [True, False, False] and result.timed_out


def test_naive_fork_bomb_is_refused():
    start = time.monotonic()
    result = run_python("import os\nwhile True:\n    os.fork()\n", ["assert True"], timeout_s=1.0)
    assert time.monotonic() - start < 1.0 + SLACK_S
    assert result.score == 0.0 and "os.fork" in (result.error or "")


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "no-namespaces"])
def test_fork_bomb_is_contained_and_killed(namespaces: bool, monkeypatch: pytest.MonkeyPatch):
    """Guards off (they refuse ctypes and fork): a real fork bomb whose processes also ``setsid``."""
    monkeypatch.setattr(sandbox, "_USE_NAMESPACES", namespaces)
    monkeypatch.setattr(sandbox, "_USE_PYTHON_GUARDS", False)
    marker = "fb" + os.urandom(6).hex()  # the process name every fork inherits (at most 15 characters)
    code = (
        "import ctypes, os\n"
        f"ctypes.CDLL(None).prctl(15, b'{marker}', 0, 0, 0)\n"  # PR_SET_NAME
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.setsid()\n"
        "    except OSError:\n"
        "        pass\n"
    )
    start = time.monotonic()
    result = run_python(code, ["assert True"], timeout_s=1.0, max_processes=16)
    assert time.monotonic() - start < 1.0 + SLACK_S
    assert result.score == 0.0 and result.timed_out
    deadline = time.monotonic() + 2.0  # SIGKILLed processes can take a moment to disappear from /proc
    while _processes_named(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_named(marker) == []


def test_thread_count_is_limited():
    code = "import threading\nev = threading.Event()\nfor _ in range(64):\n    threading.Thread(target=ev.wait).start()\n"
    result = run_python(code, ["assert True"], max_processes=16)
    if os.geteuid() == 0 and "uid" not in result.isolation:
        pytest.skip("root that could not drop its uid is exempt from RLIMIT_NPROC")
    assert result.score == 0.0 and "thread" in (result.error or "")


@pytest.mark.parametrize(
    "code",
    ["x = bytearray(10**10)\n", "a = []\nwhile True:\n    a.append(' ' * 10**6)\n"],
    ids=["one-huge-allocation", "growing-list"],
)
def test_memory_bomb_scores_zero(code: str):
    result = run_python(code, ["assert True"], timeout_s=5.0, memory_mb=256)
    assert result.score == 0.0 and result.error == "memory" and not result.timed_out


def test_print_bomb_is_truncated():
    start = time.monotonic()
    result = run_python(
        "while True:\n    print('x' * 10000)\n", ["assert True"], timeout_s=2.0, max_file_mb=2
    )
    assert time.monotonic() - start < 2.0 + SLACK_S
    assert result.score == 0.0
    assert 0 < len(result.stdout) <= 64 * 1024


# --------------------------------------------------------------------------------- forged results


def test_printed_protocol_guesses_and_early_exit_do_not_pass():
    code = (
        "import os\n"
        "print('PASS\\nok\\n1/1 tests passed\\n{\"passed\": [true]}\\ntest 0 pass', flush=True)\n"
        "for fd in range(1, 64):\n"
        "    try:\n"
        "        os.write(fd, b'test 0 pass\\nx test 0 pass\\ndone\\n')\n"
        "    except OSError:\n"
        "        pass\n"
        "os._exit(0)\n"
    )
    result = run_python(code, ["assert True"])
    assert result.passed == [False] and result.error.startswith("exit code 0")
    assert "PASS" in result.stdout


def test_exit_inside_a_test_fails_that_test_and_the_rest():
    code = ADD + "import os\ndef quit_early():\n    os._exit(0)\n"
    result = run_python(code, ["assert add(1, 1) == 2", "quit_early()", "assert add(2, 2) == 4"])
    assert result.passed == [True, False, False]


# The defect this file guards against: the program took the harness's reporting function from
# sys._getframe(1).f_locals, reported every test passed and called os._exit(0), so `assert False` scored 1.0.
# The verdicts are now made in the judge process; the program's process holds no reporter, and whatever it
# writes to the descriptors it holds is at most an answer, which the judge compares with values it never sent.
STEAL_THE_REPORTER = r"""
import gc, os, sys

def forge():
    found = []
    frame = sys._getframe(1)
    while frame is not None:
        found += list(frame.f_locals.values()) + list(frame.f_globals.values())
        frame = frame.f_back
    found += [o for o in gc.get_objects() if type(o).__name__ in ("Channel", "function")][:5000]
    records = [("ready", ""), ("solution", "ok"), *[("test", f"{i} pass") for i in range(8)], ("done",)]
    frames = [({"ok": True},), *[({"v": True},)] * 8, ({"v": None},)]
    for obj in found:
        for target in (getattr(obj, "send", None), obj if getattr(obj, "__name__", "") == "send" else None):
            for args in (records + frames) if callable(target) else ():
                try:
                    target(*args)
                except BaseException:
                    pass
    line = b"test 0 pass\n" + b"".join(b"%s test %d pass\n" % (w, i) for w in (b"x", b"0" * 32) for i in range(8))
    for fd in range(256):
        try:
            os.write(fd, line + b"done\n")
        except OSError:
            pass
    os._exit(0)

reporter = sys._getframe(1).f_locals.get("send")  # the original exploit, verbatim where it still applies
if reporter is not None:
    for i in range(8):
        reporter("test", f"{i} pass")
    reporter("done")
forge()
"""


def test_stolen_reporter_and_early_exit_score_zero(mode: str):
    result = run_python(STEAL_THE_REPORTER, ["assert False", "assert add(2, 3) == 5", "pass"])
    assert result.passed == [False, False, False] and result.score == 0.0
    assert result.error is not None  # no 'exit code 0' beside a perfect score


def test_forged_load_status_then_exit_scores_zero():
    code = "import os, sys\nsys._getframe(1).f_locals['channel'].send({'ok': True})\nos._exit(0)\n"
    result = run_python(code, ["assert True", "assert add(2, 3) == 5"])
    assert result.passed == [False, False]


ALWAYS_EQUAL = r"""
from unittest.mock import ANY

class Yes:
    def __eq__(self, other):
        return True
    __le__ = __ge__ = __eq__
    def __ne__(self, other):
        return False
    __lt__ = __gt__ = __ne__
    def __contains__(self, item):
        return True
    def __hash__(self):
        return 0

class YesInt(int):
    __eq__, __hash__ = Yes.__eq__, int.__hash__

class YesStr(str):
    __eq__, __hash__ = Yes.__eq__, str.__hash__

class YesList(list):
    __eq__ = Yes.__eq__

def add(a, b):
    return Yes()

def add_int(a, b):
    return YesInt(0)

def add_str(a, b):
    return YesStr("no")

def add_list(a, b):
    return YesList()

def add_any(a, b):
    return ANY
"""


def test_objects_that_equal_everything_score_zero(mode: str):
    tests = [
        "assert add(2, 3) == 5",
        "assert 5 == add(2, 3)",
        "assert [add(2, 3)] == [5] and (add(2, 3),) == (5,)",
        "assert add(2, 3) >= 5 and add(2, 3) <= 5",
        "assert 5 in add(2, 3)",
        "assert add(2, 3) == add(2, 3)",
        "assert add_int(2, 3) == 5",
        "assert add_str(2, 3) == '5'",
        "assert add_list(2, 3) == [5]",
        "assert add_any(2, 3) == 5",
    ]
    result = run_python(ALWAYS_EQUAL, tests)
    assert result.passed == [False] * len(tests)


FORK_EXEC = r"""
import _posixsubprocess, os
SCRIPT = (
    "echo FORKED; "
    "for f in /proc/[0-9]*/fd/*; do printf 'x test 0 pass\\nx test 1 pass\\nx done\\n' >> $f; done 2>/dev/null; "
    "cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null | head -c 100 >/dev/null"
)
args = [b"/bin/sh", b"-c", SCRIPT.encode()]
for arity in (23, 22, 21):  # the private API's signature changes between Python versions
    errpipe_read, errpipe_write = os.pipe()
    head = [args, [b"/bin/sh"], False, (), None, None, -1, -1, -1, -1, -1, -1, errpipe_read, errpipe_write]
    tail = [True, False, -1, None, None, None, -1, None, False][: arity - len(head)]
    try:
        pid = _posixsubprocess.fork_exec(*head, *tail)
    except TypeError:
        continue
    os.waitpid(pid, 0)
    break

def add(a, b):
    return 0
"""


def test_fork_exec_past_the_guards_forges_nothing(mode: str):
    result = run_python(FORK_EXEC, ["assert add(2, 3) == 5", "assert add(1, 1) == 2"])
    assert "FORKED" in result.stdout, result  # the bypass did run a process
    assert result.passed == [False, False]


def test_patched_builtins_do_not_reach_the_tests():
    code = ADD + (
        "import builtins\n"
        "builtins.abs = lambda x: 0\n"
        "builtins.sorted = lambda *a, **k: [1, 2, 3]\n"
        "builtins.isinstance = lambda *a: True\n"
        "builtins.AssertionError = KeyError\n"
        "len = lambda x: 3\n"
        "sum = lambda *a: 3\n"
        "all = lambda *a: True\n"
    )
    tests = [
        "assert abs(add(1, 1) - 3) < 1e-9",
        "assert sorted([add(1, 1)]) == [1, 2, 3]",
        "assert isinstance(add(1, 1), str)",
        "assert len([add(1, 1)]) == 3",
        "assert sum([add(1, 1)]) == 3",
        "assert all([add(1, 1) == 3])",
    ]
    assert run_python(code, tests).passed == [False] * len(tests)


def test_modules_planted_in_the_working_directory_are_not_imported_by_the_judge():
    code = ADD + (
        "for name in ('statistics', 'colorsys', 'math', 'operator'):\n"
        "    with open(name + '.py', 'w') as f:\n"
        "        f.write('mean = isclose = eq = rgb_to_hsv = lambda *a, **k: 3\\n')\n"
    )
    tests = [
        "import statistics\nassert statistics.mean([add(1, 1)]) == 3",
        "import colorsys\nassert colorsys.rgb_to_hsv(add(1, 1), 0, 0) == 3",
        "import math\nassert math.isclose(add(1, 1), 3)",
        "import operator\nassert operator.eq(add(1, 1), 3) == 3",
    ]
    assert run_python(code, tests).passed == [False] * len(tests)


def test_a_module_under_another_name_is_refused():
    code = "import unittest.mock as add\nimport math as isclose\n"
    result = run_python(code, ["assert add.ANY == 5", "from math import pi\nassert isclose.pi == pi"])
    assert result.passed == [False, False] and "as 'add'" in result.error


def test_exits_exceptions_atexit_and_signals_in_calls_forge_nothing(mode: str):
    code = (
        "import atexit, os, signal, sys\n"
        "def add(a, b):\n    raise SystemExit(0)\n"
        "def add2(a, b):\n    atexit.register(os._exit, 0)\n    sys.exit(0)\n"
        "def add3(a, b):\n    raise KeyboardInterrupt\n"
        "def add4(a, b):\n"
        "    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))\n"
        "    signal.signal(signal.SIGALRM, lambda *_: os._exit(0))\n"
        "    signal.setitimer(signal.ITIMER_REAL, 0.01)\n"
        "    return 0\n"
        "def add5(a, b):\n    signal.raise_signal(signal.SIGKILL)\n"
    )
    tests = [
        "assert add(2, 3) == 5",
        "assert add2(2, 3) == 5",
        "assert add3(2, 3) == 5",
        "try:\n    add(2, 3)\nexcept BaseException:\n    pass\nelse:\n    raise AssertionError",  # honest: it raises
        "assert add4(2, 3) == 5",
        "import time\ntime.sleep(0.2)\nassert add(2, 3) == 5",  # after the alarm ended the program
    ]
    result = run_python(code, tests)
    assert result.passed == [False, False, False, True, False, False]
    assert result.error.startswith("test 0: SolutionError: SystemExit")
    result = run_python(code, ["assert add5(2, 3) == 5", "assert add5(2, 3) == 5"])  # (init of a PID
    assert result.passed == [False, False]  # namespace survives its own SIGKILL: then add5 returns None)


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "no-namespaces"])
def test_killing_every_process_it_can_reach_forges_nothing(namespaces: bool, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sandbox, "_USE_NAMESPACES", namespaces)
    monkeypatch.setattr(sandbox, "_USE_PYTHON_GUARDS", False)
    code = "import os, signal\nfor sig in (signal.SIGSTOP, signal.SIGKILL):\n    try:\n        os.kill(-1, sig)\n    except OSError:\n        pass\ndef add(a, b):\n    return 0\n"
    result = run_python(code, ["assert add(2, 3) == 5", "assert add(0, 0) == 0"], timeout_s=3)
    assert result.passed[0] is False


HOSTILE_ANSWERS = r"""
import sys
wire = sys._getframe(1).f_globals["sandbox_wire"]
answers = iter([
    {"d": [[[1], 2]]}, {"h": "x"}, {"i": "zz"}, {"c": ["a", 1]}, {"t": 5}, {"s": [[1]]}, {"?": 1},
    {"v": True}, [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
])
real = wire.encode
def encode(value, other, depth=0):
    return next(answers, {"?": 0}) if depth == 0 and value is not None else real(value, other, depth)
wire.encode = encode
def add(a, b):
    return a + b
"""


def test_hostile_answers_fail_the_test():
    tests = ["assert add(1, 2) == 3"] * 10
    result = run_python(HOSTILE_ANSWERS, tests)
    assert result.passed == [False] * 10
    result = run_python(
        "import os, sys\nsys._getframe(1).f_locals['channel'].send({'ok': True})\n"
        "os.write(sys._getframe(1).f_locals['channel'].write_fd, b'\\xff\\xff\\xff\\xff' + b'x' * 100)\n"
        "def add(a, b):\n    return a + b\n",
        ["assert add(1, 2) == 3", "pass"],
    )
    assert result.passed == [False, False]


LEAK = r"""
import os, re

PATTERN = re.compile(rb"SECRET-[0-9a-f]{16}")

def scan_file(path):
    try:
        with open(path, "rb") as f:
            return PATTERN.findall(f.read(1 << 22))
    except Exception:
        return []

def scan_memory(pid):
    found = []
    try:
        with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
            for line in maps:
                span, perms = line.split()[:2]
                lo, hi = (int(x, 16) for x in span.split("-"))
                if perms.startswith("rw") and hi - lo <= 1 << 26:
                    try:
                        mem.seek(lo)
                        found += PATTERN.findall(mem.read(hi - lo))
                    except Exception:
                        pass
    except Exception:
        pass
    return found

def stolen(*paths):
    found = []
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    except Exception:
        pids = []
    for pid in pids:
        found += scan_file(f"/proc/{pid}/cmdline") + scan_file(f"/proc/{pid}/environ") + scan_memory(pid)
    for root in ("..", *paths):
        try:
            for dirpath, _, files in os.walk(root):
                for name in files:
                    found += scan_file(os.path.join(dirpath, name))
        except Exception:
            pass
    return found[0].decode() if found else None
"""


def test_expected_values_cannot_be_read_from_other_processes_or_disk(
    any_mode: str, tmp_path, monkeypatch: pytest.MonkeyPatch
):
    """The secret sits in this process (its memory and environment), the judge's memory, its job file, and
    a data file on disk; the program searches every process it can see and those files."""
    secret = "SECRET-" + os.urandom(8).hex()
    monkeypatch.setenv("EXPECTED_ANSWER", secret)
    (tmp_path / "dataset.jsonl").write_text(f'{{"tests": ["{secret}"]}}\\n')
    result = run_python(LEAK, [f"assert stolen({str(tmp_path)!r}) == {secret!r}"], timeout_s=10)
    protecting = {"pidns", "uid", "python-guards"} & set(result.isolation)
    if result.passed == [True] and not protecting:
        pytest.skip(f"a process of the same user, unguarded, reads this one in mode {any_mode}")
    assert result.passed == [False], result


PEEK = (
    "import os\n"
    "def readable(path):\n"
    "    try:\n"
    "        with open(path, 'rb') as f:\n"
    "            return bool(f.read(1))\n"
    "    except OSError:\n"
    "        return False\n"
    "def listing(path):\n"
    "    try:\n"
    "        return set(os.listdir(path))\n"
    "    except OSError:\n"
    "        return set()\n"
)


def test_etc_and_the_project_are_hidden(any_mode: str):
    tests = [
        "assert not readable('/etc/passwd')",
        "assert listing('/etc') <= {'ld.so.cache'}",  # (the dynamic loader's index is all /etc keeps)
        f"assert not listing({PROJECT!r})",
        f"assert not readable({os.path.join(PROJECT, 'README.md')!r})",
        f"assert not readable({os.path.join(PROJECT, 'tests', 'test_reward_sandbox.py')!r})",
    ]
    result = run_python(PEEK + "import fractions\n", tests)  # (an import of the standard library works)
    assert result.error is None or result.error.startswith("test"), result
    if not {"private-root", "readonly-fs", "python-guards"} & set(result.isolation):
        pytest.skip(f"nothing hides files without a mount namespace or the guards (mode {any_mode})")
    assert result.passed == [True] * len(tests), result
    if any_mode in ("default", "no-guards"):
        assert "private-root" in result.isolation


# ------------------------------------------------------------------------- what the judge supports


def test_humaneval_style_check_and_stdlib_modules_of_the_program():
    code = "import math\ndef area(r):\n    return math.pi * r * r\ndef add(a, b):\n    return a + b\n"
    tests = [
        "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n\ncheck(add)",
        "assert math.isclose(area(2), 4 * math.pi)",  # math: the program's import, the judge's module
        "x = add(20, 1)",
        "assert x * 2 == 42",  # the tests share one namespace
    ]
    assert run_python(code, tests).passed == [True] * 4


def test_objects_iteration_and_arguments_changed_in_place():
    code = (
        "class Stack:\n"
        "    def __init__(self):\n        self.items = []\n"
        "    def push(self, x):\n        self.items.append(x)\n"
        "    def pop(self):\n        return self.items.pop()\n"
        "    def __len__(self):\n        return len(self.items)\n"
        "    def __str__(self):\n        return f'Stack{self.items}'\n"
        "def count(n):\n    yield from range(n)\n"
        "def sort_in_place(xs, extra=None):\n    xs.sort()\n    if extra is not None:\n        extra['done'] = True\n"
        "LIMIT = 10\n"
    )
    tests = [
        "s = Stack()\ns.push(1)\ns.push(2)\nassert s.pop() == 2 and len(s) == 1 and str(s) == 'Stack[1]'",
        "assert s.items == [1] and isinstance(s.items, list) and s == s and s != Stack()",
        "assert list(count(3)) == [0, 1, 2] and sum(count(4)) == 6 and 2 in count(3)",
        "it = iter(count(2))\nassert next(it) == 0 and next(it) == 1 and next(it, None) is None",
        "xs, flags = [3, 1, 2], {}\nsort_in_place(xs, extra=flags)\nassert xs == [1, 2, 3] and flags == {'done': True}",
        "assert LIMIT == 10 and range(LIMIT)[-1] == 9",
    ]
    result = run_python(code, tests)
    assert result.passed == [True] * len(tests), result.error


def test_program_exceptions_keep_their_builtin_type():
    code = "def div(a, b):\n    return a / b\ndef check(x):\n    if x < 0:\n        raise ValueError('negative')\n"
    tests = [
        "try:\n    div(1, 0)\nexcept ZeroDivisionError:\n    pass\nelse:\n    raise AssertionError",
        "try:\n    check(-1)\nexcept ValueError as e:\n    assert str(e) == 'negative'",
        "assert div(1, 0) == 0",
    ]
    result = run_python(code, tests)
    assert result.passed == [True, True, False]
    assert result.error == "test 2: ZeroDivisionError: division by zero"


def test_only_plain_data_crosses_to_the_program():
    code = "def apply(f, x):\n    return f(x)\n"
    result = run_python(code, ["assert apply(lambda x: x + 1, 1) == 2"])
    assert result.passed == [False] and "plain data only" in result.error


def test_plain_values_cross_intact():
    code = (
        "import collections\n"
        "def value():\n"
        "    return (1, -0.0, float('inf'), 10**400, -(2**70), 1 + 2j, 'é\\udc80', b'\\x00\\xff', bytearray(b'ab'),\n"
        "            [None, True], {'a': {1, 2}}, frozenset({(1, 2)}), {(1, 'x'): [3.5]})\n"
        "def ordered():\n    return collections.OrderedDict(a=1), collections.namedtuple('P', 'x y')(1, 2)\n"
    )
    expected = (
        "(1, -0.0, float('inf'), 10**400, -(2**70), 1 + 2j, 'é\\udc80', b'\\x00\\xff', bytearray(b'ab'), "
        "[None, True], {'a': {1, 2}}, frozenset({(1, 2)}), {(1, 'x'): [3.5]})"
    )
    tests = [
        f"assert value() == {expected}",
        "import math\nassert type(value()[1]) is float and math.copysign(1, value()[1]) == -1",
        "assert ordered() == ({'a': 1}, (1, 2))",
    ]
    result = run_python(code, tests)
    assert result.passed == [True] * 3, result.error


def test_wire_codec_rebuilds_builtin_types_and_rejects_what_it_does_not_make():
    def no_handles(obj):
        raise TypeError(type(obj).__name__)

    values = [
        0,
        2**80,
        -(2**60),
        1.5,
        float("nan"),
        "s",
        b"b",
        (1, [2, {3: frozenset({4})}]),
        {1, 2},
        3j,
        None,
    ]
    for value in values:
        data = sandbox_wire.encode(value, no_handles)
        back = sandbox_wire.decode(data, no_handles)
        assert type(back) is type(value) and (back == value or value != value)

    class Sneaky(int):
        def __eq__(self, other):
            return True

    assert type(sandbox_wire.decode(sandbox_wire.encode(Sneaky(3), no_handles), no_handles)) is int
    with pytest.raises(TypeError):
        sandbox_wire.encode(object(), no_handles)
    for hostile in ({"d": [[[1], 2]]}, {"?": 1}, {"c": ["a", 1]}, {"t": 5}, {"i": "zz"}, {"t": [1], "x": 2}):
        with pytest.raises((ValueError, TypeError)):
            sandbox_wire.decode(hostile, no_handles)


# ----------------------------------------------------------------------------------------- isolation


def test_writes_outside_the_working_directory_are_contained(mode: str, tmp_path):
    target = tmp_path.parent / f"outside-{os.urandom(4).hex()}.txt"
    code = f"with open({str(target)!r}, 'w') as f:\n    f.write('escaped')\n"
    result = run_python(code, ["assert True"])
    if target.exists():
        target.unlink()
        assert not {"python-guards", "readonly-fs", "uid"} & set(result.isolation), result.isolation
        pytest.skip(f"nothing on this host stops a write as the same user in mode {mode}")
    assert result.score == 0.0


def test_writes_inside_the_working_directory_work(mode: str):
    code = (
        "import os, tempfile\n"
        "with open('notes.txt', 'w') as f:\n    f.write('hello')\n"
        "fd, path = tempfile.mkstemp()\n"
        "os.write(fd, b'again')\n"
        "os.close(fd)\n"
        "os.mkdir('sub')\n"
        "os.rename('notes.txt', 'sub/notes.txt')\n"
    )
    tests = [
        "assert open('sub/notes.txt').read() == 'hello'",
        "assert open(path).read() == 'again' and path.startswith(os.environ['TMPDIR'])",
        "assert os.environ['HOME'] == os.getcwd()",
    ]
    assert run_python(code, tests).passed == [True, True, True]


def test_parent_environment_is_not_visible(mode: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SECRET_XYZ", "hunter2")
    assert code_exec_reward("import os", ["assert os.environ.get('SECRET_XYZ') is None"], timeout_s=5) == 1.0
    assert (
        code_exec_reward("import os", ["assert os.environ.get('SECRET_XYZ') == 'hunter2'"], timeout_s=5)
        == 0.0
    )
    # Nor through /proc: the parent is hidden (PID namespace), another uid, or refused by the guards.
    probe = (
        "import os\n"
        "def parent_environ():\n"
        f"    try:\n        return open('/proc/{os.getpid()}/environ', 'rb').read()\n"
        "    except OSError:\n        return b''\n"
    )
    result = run_python(probe, ["assert b'hunter2' not in parent_environ()"])
    if result.passed != [True] and not {"python-guards", "pidns", "uid"} & set(result.isolation):
        pytest.skip(f"a process of the same user reads the parent's /proc entries in mode {mode}")
    assert result.passed == [True]


def test_network_is_unreachable(mode: str):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    with listener:
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'hi')\n"
        result = run_python(code, ["assert True"], timeout_s=5)
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            connection = None
    if connection is not None:
        connection.close()
        assert not {"python-guards", "netns"} & set(result.isolation), result.isolation
        pytest.skip(f"no network namespace on this host in mode {mode}")
    assert result.score == 0.0


# ---------------------------------------------------------------------------------------- the pool


def test_executor_runs_in_parallel_in_order():
    completions = [
        f"```python\n{ADD}```",
        "```python\ndef add(a, b):\n    return a - b\n```",
        "```python\nwhile True:\n    pass\n```",
        f"```python\n{ADD}```",
    ]
    tests = [["assert add(2, 3) == 5", "assert add(0, 0) == 0"]] * 4
    with CodeExecutor(max_workers=4, timeout_s=1.5) as executor:
        assert executor.map(completions, tests) == [1.0, 0.5, 0.0, 1.0]
        start = time.monotonic()
        results = executor.run([ADD, "while True: pass"] * 2, [["assert add(1, 1) == 2"]] * 4)
        elapsed = time.monotonic() - start
    assert all(isinstance(r, SandboxResult) for r in results)
    assert [r.passed for r in results] == [[True], [False], [True], [False]]
    assert [r.timed_out for r in results] == [False, True, False, True]
    assert elapsed < 2 * 1.5  # the two timeouts overlap (one after the other would take 3 s)


def test_executor_checks_its_inputs():
    with CodeExecutor(max_workers=1) as executor:
        with pytest.raises(ValueError, match="empty"):
            executor.map(["x = 1"], [[]])
        with pytest.raises(ValueError, match="2 programs but 1 test lists"):
            executor.run(["x = 1", "x = 2"], [["pass"]])
