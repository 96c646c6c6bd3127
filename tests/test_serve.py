"""The OpenAI-compatible server (``jaxrl_llm.serve``), tested live: uvicorn on 127.0.0.1 in a background
thread with the vendored arith-sft model, driven by real HTTP clients (the ``openai`` package and httpx).

One server for the module (loading and compiling dominate); small ``max_tokens``. The unit tests at the end
(text stream, tool calls, the request schemas) need no model.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jax
import openai
import pytest
import uvicorn

from jaxrl_llm.render import Renderer, load_tokenizer
from jaxrl_llm.rollout import ChatSampler, SamplingParams
from jaxrl_llm.serve import APIError, Piece, Service, TextStream, split_tool_calls
from jaxrl_llm.serve.app import create_app
from jaxrl_llm.serve.schemas import ChatCompletionRequest
from jaxrl_llm.serve.toolcalls import ToolCallGate

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "data" / "models" / "arith-sft"
QWEN25 = ROOT / "tests" / "data" / "tokenizers" / "qwen2.5-instruct"
SLOTS = 8
QUESTION = [{"role": "user", "content": "What is 47 + 38?"}]
CHAT_PROMPT = "<|im_start|>user\nWhat is 47 + 38?<|im_end|>\n<|im_start|>assistant\n"


class Live:
    def __init__(self, service: Service, port: int):
        self.service, self.url = service, f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)
        self.openai = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0)

    def chat(self, **body):
        return self.http.post("/v1/chat/completions", json={"messages": QUESTION, "temperature": 0} | body)

    def events(self, path: str, body: dict) -> list[str]:
        """The ``data:`` payloads of a streamed request, in order."""
        with self.http.stream("POST", path, json=body | {"stream": True}) as response:
            assert response.status_code == 200, response.read()
            return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live():
    service = Service.load(MODEL, slots=SLOTS, timeout=120).start()
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield Live(service, port)
    server.should_exit = True
    thread.join(10)
    service.stop()


def _wait_idle(live: Live, seconds: float = 5.0) -> float:
    """Seconds until /health shows no busy slot (fails after ``seconds``)."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        health = live.http.get("/health").json()
        if health["busy_slots"] == 0 and health["waiting"] == 0:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"slots still busy after {seconds} s: {live.http.get('/health').json()}")


def _content(events: list[str]) -> str:
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# ------------------------------------------------------------------------------------------ the API


def test_health_and_models(live):
    assert live.http.get("/health").json()["status"] == "ok"
    models = live.openai.models.list()
    assert [m.id for m in models.data] == ["arith-sft"]
    assert models.data[0].max_model_len == 512


CONVERSATIONS = [
    QUESTION,
    [{"role": "system", "content": "You add."}, {"role": "user", "content": "What is 12 + 30?"}],
]


@pytest.fixture(scope="module")
def reference(live):
    """``ChatSampler``'s greedy completions of ``CONVERSATIONS`` (the one-shot sampler, no engine)."""
    service = live.service
    return ChatSampler(service.model, service.renderer, batch_size=2).generate(
        CONVERSATIONS, key=jax.random.key(0), max_new_tokens=16, sampling=SamplingParams.greedy()
    )


def test_greedy_answer_is_chat_samplers(live, reference):
    """The served greedy answer (and its token count, end-of-turn included) is ChatSampler's for the same
    conversations: the same template, the same end-of-turn, the same decoding."""
    service = live.service
    for messages, (expected,) in zip(CONVERSATIONS, reference, strict=True):
        got = live.openai.chat.completions.create(
            model="arith-sft", messages=messages, temperature=0, max_tokens=16
        )
        assert got.choices[0].message.content == expected.text
        assert got.choices[0].finish_reason == "stop"
        assert (
            got.usage.prompt_tokens == len(service.renderer.render_prompt(messages)) == expected.prompt_tokens
        )
        assert got.usage.completion_tokens == len(expected.token_ids)
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert reference[0][0].text == "85"


def test_streaming_reassembles_the_answer(live):
    stream = live.openai.chat.completions.create(
        model="arith-sft", messages=QUESTION, temperature=0, max_tokens=16, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "85"
    assert chunks[-1].choices[0].finish_reason == "stop"
    events = live.events(
        "/v1/chat/completions",
        {"messages": QUESTION, "temperature": 0, "stream_options": {"include_usage": True}},
    )
    assert events[-1] == "[DONE]"
    assert _content(events) == "85"
    final = json.loads(events[-2])
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 3
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def test_n_and_seed(live):
    def texts(seed, n=4):
        response = live.http.post(
            "/v1/completions",
            json={"prompt": CHAT_PROMPT, "temperature": 1.0, "max_tokens": 8, "ignore_eos": True, "n": n}
            | ({"seed": seed} if seed is not None else {}),
        )
        assert response.status_code == 200, response.text
        choices = response.json()["choices"]
        assert [c["index"] for c in choices] == list(range(n))
        assert all(c["finish_reason"] == "length" for c in choices)
        return [c["text"] for c in choices]

    first = texts(7)
    assert len(set(first)) > 1  # n answers, each its own seed
    assert texts(7) == first  # a seed reproduces them ...
    assert texts(8, n=1) == first[1:2]  # ... choice i draws with seed + i
    assert texts(9) != first
    chat = live.openai.chat.completions.create(
        model="arith-sft", messages=QUESTION, temperature=1.0, n=3, seed=3, max_tokens=8
    )
    assert len(chat.choices) == 3 and chat.usage.prompt_tokens == 35


def test_stop_strings(live):
    cut = live.chat(stop="5").json()
    assert cut["choices"][0]["message"]["content"] == "8"
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] == 2  # the engine request was cancelled at the match
    assert live.chat(stop=["85"]).json()["choices"][0]["message"]["content"] == ""
    assert live.chat(stop=["xyz", "9"]).json()["choices"][0]["message"]["content"] == "85"
    events = live.events("/v1/chat/completions", {"messages": QUESTION, "temperature": 0, "stop": ["5"]})
    assert _content(events) == "8" and events[-1] == "[DONE]"
    text = live.http.post("/v1/completions", json={"prompt": CHAT_PROMPT, "temperature": 0, "stop": "5"})
    assert text.json()["choices"][0]["text"] == "8"
    _wait_idle(live)


def test_logprobs(live, reference):
    got = live.chat(logprobs=True, top_logprobs=3).json()["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in got] == ["8", "5"]
    for entry, expected in zip(got, reference[0][0].model_logprobs, strict=False):
        assert entry["logprob"] == pytest.approx(expected, abs=1e-4)
        assert entry["bytes"] == list(entry["token"].encode())
        top = entry["top_logprobs"]
        assert len(top) == 3 and top[0]["token"] == entry["token"]
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
    text = live.http.post("/v1/completions", json={"prompt": CHAT_PROMPT, "temperature": 0, "logprobs": 2})
    logprobs = text.json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["8", "5"] and logprobs["text_offset"] == [0, 1]
    assert [len(t) for t in logprobs["top_logprobs"]] == [2, 2]
    assert live.chat().json()["choices"][0]["logprobs"] is None


def test_completions(live):
    service = live.service
    ids = service.renderer.encode(CHAT_PROMPT).tolist()
    for prompt in (CHAT_PROMPT, ids):
        response = live.openai.completions.create(
            model="arith-sft", prompt=prompt, temperature=0, max_tokens=8
        )
        assert response.choices[0].text == "85"
        assert response.usage.prompt_tokens == len(ids)
    batch = live.http.post(
        "/v1/completions",
        json={"prompt": [CHAT_PROMPT, CHAT_PROMPT], "temperature": 0, "max_tokens": 8, "n": 2},
    ).json()
    assert [c["text"] for c in batch["choices"]] == ["85"] * 4
    assert batch["usage"]["prompt_tokens"] == 2 * len(ids)
    events = live.events("/v1/completions", {"prompt": CHAT_PROMPT, "temperature": 0})
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "85" and events[-1] == "[DONE]"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_tool_messages_are_rendered(live):
    """Tools, an assistant's tool calls and the tool's result are accepted and rendered (the arith model's
    ChatML template writes every message; its prompt is what the renderer makes of the canonical form)."""
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages = QUESTION + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 47, "b": 38}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "85"},
    ]
    response = live.openai.chat.completions.create(
        model="arith-sft", messages=messages, tools=tools, temperature=0, max_tokens=8
    )
    canonical, canonical_tools = ChatCompletionRequest(messages=messages, tools=tools).canonical()
    assert canonical[2] == {"role": "tool", "content": "85", "name": "add"}
    assert canonical[1]["tool_calls"] == [{"name": "add", "arguments": {"a": 47, "b": 38}}]
    expected = live.service.renderer.render_prompt(canonical, canonical_tools)
    assert response.usage.prompt_tokens == len(expected)
    assert response.choices[0].finish_reason in ("stop", "length")


def _fake_generate(text: str):
    async def generate(prompts, settings):
        for ch in text:
            yield Piece(0, ch, count=1)
        yield Piece(0, "", count=1, finish_reason="stop")

    return generate


def test_generated_tool_calls_come_back_as_tool_calls(live, monkeypatch):
    """What the model writes as ``<tool_call>`` blocks is returned as ``tool_calls`` (non-streamed and
    streamed alike); the model is replaced by a canned answer (the arith model does not call tools)."""
    answer = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 47, "b": 38}}\n</tool_call>'
    monkeypatch.setattr(live.service, "generate", _fake_generate(answer))
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    response = live.openai.chat.completions.create(model="arith-sft", messages=QUESTION, tools=tools)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me add.\n"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "add" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"a": 47, "b": 38}
    chunks = list(
        live.openai.chat.completions.create(model="arith-sft", messages=QUESTION, tools=tools, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me add.\n"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    (streamed,) = chunks[-1].choices[0].delta.tool_calls
    assert streamed.index == 0 and streamed.function.name == "add"
    # Without tools declared (or tool_choice "none") the text is returned as it is.
    plain = live.openai.chat.completions.create(model="arith-sft", messages=QUESTION)
    assert plain.choices[0].message.content == answer and plain.choices[0].message.tool_calls is None


def test_engine_failure_is_an_error_body(live, monkeypatch):
    async def failing(prompts, settings):
        yield Piece(0, "8", count=1)
        yield Piece(0, "", finish_reason="error", error="RuntimeError: boom")

    monkeypatch.setattr(live.service, "generate", failing)
    response = live.chat()
    assert response.status_code == 500 and "boom" in response.json()["error"]["message"]
    events = live.events("/v1/chat/completions", {"messages": QUESTION})
    assert any("boom" in e for e in events) and events[-1] == "[DONE]"


# ------------------------------------------------------------------------------------ bad requests

LONG = "What is 47 + 38? " * 200
BAD = [
    ("malformed JSON", b'{"messages": [}', None),
    ("truncated JSON", b'{"messages": [{"role": "user", "content": "What', None),
    ("not UTF-8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', None),
    ("empty body", b"", None),
    ("not an object", b"[1, 2]", None),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', None),
    ("no messages", {}, "messages"),
    ("empty messages", {"messages": []}, "messages"),
    ("messages not a list", {"messages": "hi"}, "messages"),
    ("content a number", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("no role", {"messages": [{"content": "hi"}]}, "messages[0].role"),
    ("user without content", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None),
    (
        "bad tool arguments",
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]},
        None,
    ),
    ("prompt beyond the context", {"messages": [{"role": "user", "content": LONG}]}, "messages"),
    ("negative temperature", {"temperature": -0.5}, "temperature"),
    ("temperature a string", {"temperature": "hot"}, "temperature"),
    (
        "temperature NaN",
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        "temperature",
    ),
    ("top_p 0", {"top_p": 0}, "top_p"),
    ("top_p above 1", {"top_p": 1.5}, "top_p"),
    ("min_p 1", {"min_p": 1.0}, "min_p"),
    ("top_k -2", {"top_k": -2}, "top_k"),
    ("max_tokens 0", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens negative", {"max_tokens": -5}, "max_tokens"),
    ("max_tokens a float", {"max_tokens": 4.5}, "max_tokens"),
    ("max_tokens beyond the context", {"max_tokens": 100_000}, "max_tokens"),
    ("max_completion_tokens beyond the context", {"max_completion_tokens": 500}, "max_tokens"),
    ("huge n", {"n": 10_000}, "n"),
    ("n 0", {"n": 0}, "n"),
    ("stop a number", {"stop": 5}, "stop"),
    ("empty stop", {"stop": [""]}, "stop"),
    ("too many stops", {"stop": [str(i) for i in range(40)]}, "stop"),
    ("top_logprobs 50", {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, "top_logprobs"),
    ("seed beyond int64", {"seed": 2**70}, "seed"),
    ("penalty", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("forced tool", {"tool_choice": "required"}, "tool_choice"),
    ("stream a string", {"stream": "yes"}, "stream"),
]


@pytest.mark.parametrize("body, param", [(b, p) for _, b, p in BAD], ids=[name for name, _, _ in BAD])
def test_bad_chat_requests_are_400(live, body, param):
    if isinstance(body, dict):
        body = json.dumps({"messages": QUESTION} | body if "messages" not in body and body else body).encode()
    response = live.http.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error


@pytest.mark.parametrize(
    "body, status",
    [
        ({"prompt": CHAT_PROMPT, "model": "gpt-4"}, 404),
        ({"prompt": ""}, 400),
        ({"prompt": []}, 400),
        ({"prompt": [1, 2, 99_999]}, 400),
        ({"prompt": [1, -1]}, 400),
        ({"prompt": [1, "a"]}, 400),
        ({"prompt": {"text": "hi"}}, 400),
        ({"prompt": CHAT_PROMPT, "echo": True}, 400),
        ({"prompt": CHAT_PROMPT, "logprobs": 21}, 400),
        ({"prompt": [CHAT_PROMPT] * 5, "n": 2}, 400),  # 10 answers > 8 slots
        ({"prompt": LONG}, 400),
    ],
)
def test_bad_completion_requests(live, body, status):
    response = live.http.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]


def test_unknown_model_routes_and_methods(live):
    with pytest.raises(openai.NotFoundError) as err:
        live.openai.chat.completions.create(model="gpt-4", messages=QUESTION)
    assert err.value.body["code"] == "model_not_found"
    assert live.http.get("/v1/nowhere").status_code == 404
    assert live.http.get("/v1/chat/completions").status_code == 405
    assert "error" in live.http.get("/v1/nowhere").json()
    too_big = live.http.post("/v1/completions", content=b" " * (17 * 2**20))
    assert too_big.status_code == 413
    with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1]))) as raw:  # a body cut short
        raw.sendall(
            b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{"messages": ['
        )
        raw.shutdown(socket.SHUT_WR)
        raw.settimeout(5)
        answer = raw.recv(1000)  # the server closes (or answers 400); it does not hang or crash
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer
    assert live.http.get("/health").status_code == 200  # and the server is still there


# --------------------------------------------------------------------- concurrency, disconnects, timeout


def test_32_concurrent_streams(live):
    """32 streaming clients at once (4x the slots: the rest queue) all finish, with the answers they get
    alone."""
    questions = [[{"role": "user", "content": f"What is {a} + {a + 11}?"}] for a in range(10, 42)]

    def ask(messages, stream):
        with httpx.Client(base_url=live.url, timeout=120) as client:
            body = {"messages": messages, "temperature": 0, "max_tokens": 8, "stream": stream}
            if not stream:
                return client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"][
                    "content"
                ]
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
            return _content(events)

    with ThreadPoolExecutor(32) as pool:
        streamed = list(pool.map(lambda q: ask(q, True), questions))
    alone = [ask(q, False) for q in questions]
    assert streamed == alone
    assert (
        sum(a == str(2 * int(q[0]["content"].split()[2]) + 11) for a, q in zip(alone, questions, strict=True))
        > 24
    )
    _wait_idle(live)


class _CancelSpy:
    def __init__(self, engine):
        self.engine, self.cancel, self.requests = engine, engine.cancel, []

    def __call__(self, request):
        self.requests.append(request)
        self.cancel(request)


@pytest.fixture
def slow_engine(live, monkeypatch):
    """Engine steps of at least 10 ms (the tiny model makes 400 tokens in well under a second on a CPU): a
    long answer takes seconds, so what ends it early is what is being tested, not how fast the model is."""
    engine = live.service.engine
    step = engine.step

    def slow_step():
        time.sleep(0.01)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    return engine


def test_disconnect_frees_the_slot(live, monkeypatch, slow_engine):
    """A client that goes away mid-stream (or before a non-streamed answer is done) has its engine request
    cancelled: the slot is free long before its 400 tokens would have been made."""
    spy = _CancelSpy(slow_engine)
    monkeypatch.setattr(live.service.engine, "cancel", spy)
    body = {"messages": QUESTION, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with live.http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
    assert _wait_idle(live) < 1.0
    assert spy.requests and len(spy.requests[-1].generated) < 400
    spy.requests.clear()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{live.url}/v1/completions", json=body | {"prompt": CHAT_PROMPT, "stream": False}, timeout=0.3
        )
    assert _wait_idle(live) < 1.0
    assert spy.requests and len(spy.requests[-1].generated) < 400


def test_timeout_ends_the_answer(live, monkeypatch, slow_engine):
    monkeypatch.setattr(live.service, "timeout", 0.3)
    body = {"prompt": CHAT_PROMPT, "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    response = live.http.post("/v1/completions", json=body).json()
    assert response["choices"][0]["finish_reason"] == "length"
    assert response["usage"]["completion_tokens"] < 400
    events = live.events("/v1/completions", body)
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length" and events[-1] == "[DONE]"
    _wait_idle(live)


# ------------------------------------------------------------------------------- units (no model)


class _Chars:
    """A tokenizer whose ids are characters (for the stop-string logic alone)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _run(stream: TextStream, text: str) -> list[str]:
    deltas = [stream.push(ord(c)) for c in text]
    return deltas + [stream.finish()]


def test_stop_strings_hold_back_and_cut():
    stream = TextStream(_Chars(), stop=["</s>", "STOP"])
    deltas = _run(stream, "ab</x>cd</s>ef")
    assert "".join(deltas) == "ab</x>cd" and stream.stopped == "</s>"
    assert deltas[2:4] == ["", ""]  # "<", "</" could start "</s>": held back until "x" rules it out
    stream = TextStream(_Chars(), stop=["xyz", "yz!"])
    assert "".join(_run(stream, "aayz!xyz")) == "aa" and stream.stopped == "yz!"  # the earliest match wins
    stream = TextStream(_Chars(), stop=["abc"])
    assert "".join(_run(stream, "xxab")) == "xxab" and stream.stopped is None  # held text flushed at the end


def test_incremental_decoding_equals_decoding_everything():
    """Byte-level BPE tokens split multi-byte characters: nothing half-decoded is emitted, and the deltas
    add up to the full decode (Qwen2.5's real tokenizer)."""
    tok = load_tokenizer(QWEN25)
    text = "Zürich ☃ 東京 🙂🙂 naïve — ok\n```py\nx = 1\n```"
    ids = tok.encode(text) + [tok.eos_id]
    stream = TextStream(tok)
    deltas = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 0  # some tokens were partial characters
    cut = TextStream(tok, stop=["東京"])
    assert "".join(cut.push(i) for i in ids) + cut.finish() == "Zürich ☃ "


def test_split_tool_calls():
    text = 'I will look.\n<tool_call>\n{"name": "get", "arguments": {"q": "x"}}\n</tool_call>\n<tool_call>{"name": "put", "arguments": "{\\"v\\": 1}"}</tool_call>'
    content, calls = split_tool_calls(text)
    assert content == "I will look."
    assert [c["function"]["name"] for c in calls] == ["get", "put"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"q": "x"}, {"v": 1}]
    assert len({c["id"] for c in calls}) == 2 and all(c["type"] == "function" for c in calls)
    content, (call,) = split_tool_calls('<tool_call>{"name": "f"}</tool_call>')
    assert content is None and call["function"] == {"name": "f", "arguments": "{}"}
    assert split_tool_calls("no calls") == ("no calls", [])
    bad = "<tool_call>{not json}</tool_call>"
    assert split_tool_calls(bad) == (bad, [])  # a malformed call is shown, not dropped
    assert split_tool_calls('<tool_call>{"arguments": {}}</tool_call>')[1] == []  # no name
    gate = ToolCallGate()
    shown = "".join(gate.push(c) for c in text)
    rest, calls = gate.finish()
    assert shown == "I will look.\n" and rest == "" and len(calls) == 2
    gate = ToolCallGate()
    assert "".join(gate.push(c) for c in "a <tool_ b") + gate.finish()[0] == "a <tool_ b"


def test_request_tools_render_with_a_tool_template():
    """A request's tools, tool calls and tool results reach a template that renders them (Qwen2.5's)."""
    request = ChatCompletionRequest(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Oslo?"}],
            },
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "x1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "x1", "content": "-3 C"},
        ],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "weather",
                    "description": "Current weather",
                    "parameters": {"type": "object"},
                },
            }
        ],
    )
    messages, tools = request.canonical()
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["content"] == "Weather in Oslo?"
    text = Renderer(load_tokenizer(QWEN25)).render_text(messages, tools, add_generation_prompt=True)
    assert '"name": "weather"' in text and "Current weather" in text and "Be brief." in text
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert "<tool_response>\n-3 C\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    with pytest.raises(APIError) as err:
        ChatCompletionRequest(messages=[{"role": "user", "name": "x"}]).canonical()
    assert err.value.param == "messages[0].content"


def test_a_port_in_use_is_one_line_before_loading(capsys):
    from jaxrl_llm.serve.__main__ import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # A checkpoint that does not exist: the port is checked first, so the model is never loaded.
        assert main(["--checkpoint", "/nonexistent", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err, err
