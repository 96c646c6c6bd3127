"""The continuous-batching engine: the same answers as the one-shot sampler, whatever else shares the batch.

Uses the vendored tiny SFT model (``tests/data/models/arith-sft``: two-digit sums, ChatML), so greedy
answers are real answers ("What is 47 + 38?" -> "85").
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxrl_llm.checkpoint.target import resolve_target, target_renderer
from jaxrl_llm.models import load_hf
from jaxrl_llm.rollout import ChatSampler, SamplingParams, end_of_turn_ids
from jaxrl_llm.rollout.engine import MAX_TOP_LOGPROBS, Engine, Request

MODEL = Path(__file__).parent / "data" / "models" / "arith-sft"
SUMS = [(47, 38), (12, 5), (99, 1), (3, 4), (60, 21), (8, 88)]


@pytest.fixture(scope="module")
def setup():
    target = resolve_target(MODEL)
    renderer = target_renderer(target)
    model = load_hf(target.model_dir)
    engine = Engine(model, slots=4, max_len=96, eos_ids=end_of_turn_ids(renderer))
    return model, renderer, engine


def _conversation(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {a} + {b}?"}]


def _request(renderer, conv, max_new_tokens=8, **kw) -> Request:
    events = []
    request = Request(renderer.render_prompt(conv).tolist(), max_new_tokens, on_event=events.append, **kw)
    request.events = events  # type: ignore[attr-defined]
    return request


def _tokens(request) -> list[int]:
    return [e.token for e in request.events if e.token is not None]


def test_greedy_answers_equal_the_one_shot_sampler(setup):
    model, renderer, engine = setup
    convs = [_conversation(a, b) for a, b in SUMS]  # more than the 4 slots: two waves through the queue
    expected = ChatSampler(model, renderer, batch_size=8).generate(
        convs, key=jax.random.key(0), max_new_tokens=8, sampling=SamplingParams.greedy()
    )
    requests = [_request(renderer, c, sampling=SamplingParams.greedy()) for c in convs]
    engine.generate(requests)
    for request, (completion,) in zip(requests, expected, strict=True):
        assert _tokens(request) == completion.token_ids
        assert request.events[-1].finish_reason == completion.finish_reason == "eos"
    assert renderer.tokenizer.decode(_tokens(requests[0]), skip_special_tokens=True) == "85"
    assert engine.busy_slots == 0 and engine.waiting == 0


def test_logprobs_equal_a_full_forward_of_the_answer(setup):
    """The per-row cache holds the right keys at the right positions: every reported log-prob (and the top
    alternatives) equals the teacher-forced forward of prompt + answer, for a row that joined mid-decode."""
    model, renderer, engine = setup
    long = _request(renderer, _conversation(5, 6), max_new_tokens=12, ignore_eos=True)
    engine.submit(long)
    engine.step()
    engine.step()  # ``late`` joins while ``long`` is decoding, in another slot, with another prompt length
    late = _request(
        renderer, _conversation(47, 38) + [], max_new_tokens=10, ignore_eos=True, top_logprobs=3, seed=7
    )
    late.sampling = SamplingParams(temperature=1.0)
    engine.submit(late)
    while engine.busy_slots:
        engine.step()
    for request in (long, late):
        ids = np.asarray(list(request.prompt) + _tokens(request), np.int32)[None]
        logp = np.asarray(jax.nn.log_softmax(model(ids)[0], axis=-1))
        start = len(request.prompt) - 1
        want = [logp[start + i, t] for i, t in enumerate(_tokens(request))]
        got = [e.logprob for e in request.events]
        np.testing.assert_allclose(got, want, atol=2e-4)
    for i, event in enumerate(late.events):
        row = logp[len(late.prompt) - 1 + i]
        top = np.argsort(-row)[:3]
        assert [t for t, _ in event.top] == top.tolist()
        np.testing.assert_allclose([lp for _, lp in event.top], row[top], atol=2e-4)
    assert long.events[-1].finish_reason == "length" and len(_tokens(long)) == 12


def test_a_seed_gives_the_same_answer_under_any_load(setup):
    model, renderer, engine = setup
    sampling = SamplingParams(temperature=1.5, top_k=50)
    alone = _request(
        renderer, _conversation(3, 4), max_new_tokens=10, sampling=sampling, seed=123, ignore_eos=True
    )
    engine.generate([alone])
    busy = [
        _request(renderer, _conversation(a, b), sampling=sampling, max_new_tokens=10) for a, b in SUMS[:3]
    ]
    again = _request(
        renderer, _conversation(3, 4), max_new_tokens=10, sampling=sampling, seed=123, ignore_eos=True
    )
    for r in busy[:2]:
        engine.submit(r)
    engine.step()
    engine.generate([busy[2], again])  # another slot, other rows beside it
    assert _tokens(again) == _tokens(alone)
    other = _request(
        renderer, _conversation(3, 4), max_new_tokens=10, sampling=sampling, seed=124, ignore_eos=True
    )
    engine.generate([other])
    assert _tokens(other) != _tokens(alone)


def test_stop_sequences_budget_and_cancel_free_the_slot(setup):
    model, renderer, engine = setup
    stop = _request(renderer, _conversation(47, 38), sampling=SamplingParams.greedy())
    stop.stop_ids = [renderer.encode("8").tolist()]
    budget = _request(renderer, _conversation(47, 38), max_new_tokens=1, sampling=SamplingParams.greedy())
    engine.generate([stop, budget])
    assert stop.events[-1].finish_reason == "stop" and len(_tokens(stop)) == 1
    assert budget.events[-1].finish_reason == "length" and len(_tokens(budget)) == 1

    endless = _request(renderer, _conversation(1, 2), max_new_tokens=60, ignore_eos=True)
    engine.submit(endless)
    engine.step()
    engine.step()
    assert engine.busy_slots == 1
    engine.cancel(endless)
    engine.step()
    assert engine.busy_slots == 0
    assert endless.events[-1].finish_reason == "cancelled" and len(_tokens(endless)) < 60


def test_requests_that_cannot_be_served_are_refused(setup):
    model, renderer, engine = setup
    with pytest.raises(ValueError, match="exceed the context of 96 tokens"):
        engine.submit(_request(renderer, _conversation(1, 2), max_new_tokens=90))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        engine.submit(_request(renderer, _conversation(1, 2), max_new_tokens=0))
    with pytest.raises(ValueError, match="top_p"):
        engine.submit(_request(renderer, _conversation(1, 2), sampling=SamplingParams(top_p=0.0)))
    with pytest.raises(ValueError, match="top_logprobs"):
        engine.submit(_request(renderer, _conversation(1, 2), top_logprobs=MAX_TOP_LOGPROBS + 1))
    with pytest.raises(ValueError, match="slots"):
        Engine(model, slots=0)
    assert engine.waiting == 0


def test_background_loop_serves_concurrent_submitters(setup):
    model, renderer, engine = setup
    engine.start()
    try:
        done = []
        finished = threading.Event()

        def on_event(event, i, tokens):
            if event.token is not None:
                tokens.append(event.token)
            if event.finish_reason:
                done.append((i, tokens))
                if len(done) == len(SUMS):
                    finished.set()

        for i, (a, b) in enumerate(SUMS):
            ids = renderer.render_prompt(_conversation(a, b)).tolist()
            tokens: list[int] = []
            engine.submit(
                Request(
                    ids,
                    8,
                    on_event=lambda e, i=i, t=tokens: on_event(e, i, t),
                    sampling=SamplingParams.greedy(),
                )
            )
            time.sleep(0.01)
        assert finished.wait(120)
        answers = {i: renderer.tokenizer.decode(t, skip_special_tokens=True) for i, t in done}
        assert answers[0] == "85" and answers[3] == "7"
    finally:
        engine.stop()


def test_a_freed_slot_stops_advancing_its_cache_index(setup):
    """A slot whose request ended writes nowhere new: its cache index stops moving, below the live rows', so
    the slots a decode step reads (up to the highest index among its rows, in blocks) stay bounded by the
    requests still running, and the one still running answers as it does alone."""
    model, renderer, engine = setup
    greedy = SamplingParams.greedy()
    alone = _request(renderer, _conversation(5, 6), max_new_tokens=10, ignore_eos=True, sampling=greedy)
    engine.generate([alone])
    # ``short`` takes slot 0 and ends at the first step; ``long`` goes on in slot 1, so every later step
    # decodes rows 0-1 with the freed slot among them. ``short``'s prompt is the longer: an index it kept
    # advancing would stay above the live one's.
    short = _request(renderer, _conversation(47, 38), max_new_tokens=2, ignore_eos=True, sampling=greedy)
    long = _request(renderer, _conversation(5, 6), max_new_tokens=10, ignore_eos=True, sampling=greedy)
    assert len(short.prompt) > len(long.prompt)
    engine.submit(short)
    engine.submit(long)
    engine.step()
    engine.step()
    assert short.events[-1].finish_reason == "length" and engine.busy_slots == 1
    before = np.asarray(engine.state.cache.index)
    while engine.busy_slots:
        engine.step()
        index = np.asarray(engine.state.cache.index)
        np.testing.assert_array_equal(index[[0, 2, 3]], before[[0, 2, 3]])  # the free slots stay put
        assert index[[0, 2, 3]].max() <= index[1]  # the highest filled slot is the live request's
    assert _tokens(long) == _tokens(alone)
    np.testing.assert_allclose([e.logprob for e in long.events], [e.logprob for e in alone.events], atol=1e-5)
