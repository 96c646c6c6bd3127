"""``python -m jaxrl_llm.chat``: one answer with ``--prompt``, and the interactive chat (in process with a
scripted stdin, and for real through a pseudo terminal), with the vendored arith-sft model."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxrl_llm.chat.__main__ import main
from jaxrl_llm.serve.service import Service

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "tests" / "data" / "models" / "arith-sft")


def test_prompt_prints_the_answer(capsys):
    assert main([MODEL, "--prompt", "What is 47 + 38?"]) == 0
    assert capsys.readouterr().out == "85\n"


def test_interactive_keeps_the_conversation(capsys, monkeypatch):
    seen: list[list[dict]] = []
    render = Service.chat_prompt

    def recording(self, messages, tools=None):
        seen.append([dict(m) for m in messages])
        return render(self, messages, tools)

    monkeypatch.setattr(Service, "chat_prompt", recording)
    script = (
        "What is 47 + 38?\n/system You add.\nWhat is 12 + 30?\n\n/reset\nWhat is 20 + 22?\n/system\n/reset\n"
    )
    script += "What is 47 + 38?\n/exit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main([MODEL, "--max-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    answers = [a for a in out.split("> ") if a]
    assert len(answers) == 4 and answers[0] == answers[3] == "85\n"  # the same answer in a new conversation
    assert (
        "(conversation cleared)" in err and "(system prompt set)" in err and "(system prompt removed)" in err
    )
    assert [m["content"] for m in seen[0]] == ["What is 47 + 38?"]
    assert [m["content"] for m in seen[1]] == ["You add.", "What is 47 + 38?", "85", "What is 12 + 30?"]
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "user"]
    assert [m["content"] for m in seen[2]] == [
        "You add.",
        "What is 20 + 22?",
    ]  # /reset keeps the system prompt


def test_bad_checkpoint_is_one_line(capsys, tmp_path):
    assert main([str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "jaxrl_llm.chat:" in err and "Traceback" not in err


def _read_until(fd: int, marker: bytes, seconds: float) -> bytes:
    out, deadline = b"", time.monotonic() + seconds
    while marker not in out:
        assert time.monotonic() < deadline, f"no {marker!r} in {out!r}"
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            out += chunk
    return out


@pytest.mark.slow
def test_interactive_through_a_terminal():
    """The real thing: a subprocess on a pseudo terminal; the answer streams to it, /reset and /exit work."""
    leader, follower = pty.openpty()
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    child = subprocess.Popen(
        [sys.executable, "-m", "jaxrl_llm.chat", MODEL, "--max-tokens", "8"],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        cwd=ROOT,
        env=env,
        close_fds=True,
    )
    os.close(follower)
    try:
        _read_until(leader, b"> ", 120)
        os.write(leader, b"What is 47 + 38?\n")
        answer = _read_until(leader, b"85", 120)
        _read_until(leader, b"> ", 30)
        os.write(leader, b"/reset\n")
        assert b"(conversation cleared)" in _read_until(leader, b"cleared", 30)
        os.write(leader, b"/exit\n")
        assert child.wait(30) == 0
        assert b"85" in answer
    finally:
        if child.poll() is None:
            child.kill()
        os.close(leader)
