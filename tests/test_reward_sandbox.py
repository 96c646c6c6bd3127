"""The code-execution sandbox and reward: scoring, and containment of hostile programs.

Containment tests run in up to three modes: the default (every layer the host allows), without namespaces
(as on a CI runner that has none), and without the Python guards (the kernel layers alone). A mode that
lacks the layer a test needs on this host is skipped, so the file passes on any Linux machine, root or not.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest

from jaxrl_llm.reward import sandbox
from jaxrl_llm.reward.sandbox import CodeExecutor, SandboxResult, code_exec_reward, extract_code, run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

SLACK_S = 2.0  # start-up and cleanup on a loaded 2-core runner; a run itself takes ~0.05 s

ADD = "def add(a, b):\n    return a + b\n"


@pytest.fixture(params=["default", "no-namespaces", "no-guards"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(sandbox, "_USE_NAMESPACES", request.param != "no-namespaces")
    monkeypatch.setattr(sandbox, "_USE_PYTHON_GUARDS", request.param != "no-guards")
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
