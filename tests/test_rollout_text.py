"""The text layer: messages rendered exactly as training renders them, sampled, decoded; stop strings;
groups; records with tools; clear errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxrl_llm.errors import UserError
from jaxrl_llm.models import create_model, get_preset
from jaxrl_llm.render import Renderer, load_tokenizer
from jaxrl_llm.rollout import ChatSampler, Sampler, SamplingParams, end_of_turn_ids, left_pad
from tests.fixtures_tokenizers import make_hf_tokenizer_dir

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    {"messages": [{"role": "user", "content": "Hello there"}]},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = load_tokenizer(make_hf_tokenizer_dir(tmp_path_factory.mktemp("tok")))
    renderer = Renderer(tok, "chatml")
    model = create_model(get_preset("llama-tiny", vocab_size=tok.vocab_size), seed=0)
    return model, renderer


def test_greedy_text_is_the_sampler_on_the_training_prompt(setup):
    model, renderer = setup
    chat = ChatSampler(model, renderer, batch_size=2)  # 3 conversations: two chunks, the last padded
    got = chat.generate(
        CONVERSATIONS, key=jax.random.key(0), max_new_tokens=12, sampling=SamplingParams.greedy()
    )
    assert [len(c) for c in got] == [1, 1, 1]

    tok = renderer.tokenizer
    prompts = [
        renderer.render_prompt(c["messages"] if isinstance(c, dict) else c).tolist() for c in CONVERSATIONS
    ]
    ids, mask = left_pad(prompts, chat.pad_id)
    want = Sampler(model, eos_ids=end_of_turn_ids(renderer), pad_id=chat.pad_id).sample(
        ids, mask, key=jax.random.key(0), max_new_tokens=12, sampling=SamplingParams.greedy()
    )
    for r, (completion,) in enumerate(got):
        length = int(want.lengths[r])
        assert completion.token_ids == np.asarray(want.tokens[r][:length]).tolist()
        assert completion.text == tok.decode(completion.token_ids, skip_special_tokens=True)
        assert completion.prompt_tokens == len(prompts[r])
        assert len(completion.logprobs) == len(completion.model_logprobs) == length
        assert completion.finish_reason in ("length", "eos")


def test_stop_strings_end_the_answer_and_are_left_out_of_the_text(setup):
    model, renderer = setup
    chat = ChatSampler(model, renderer, batch_size=1)
    conversation = CONVERSATIONS[:1]
    (full,) = chat.generate(
        conversation, key=jax.random.key(0), max_new_tokens=12, sampling=SamplingParams.greedy()
    )[0:1]
    tokens = full[0].token_ids
    # A generated token (after the first) whose text encodes back to itself alone: a clean stop string.
    position, stop = next(
        (i, renderer.tokenizer.decode([t]))
        for i, t in enumerate(tokens)
        if i >= 1 and renderer.encode(renderer.tokenizer.decode([t])).tolist() == [t]
    )
    first = tokens.index(tokens[position])  # the stop fires at its first occurrence
    (got,) = chat.generate(
        conversation, key=jax.random.key(0), max_new_tokens=12, sampling=SamplingParams.greedy(), stop=[stop]
    )[0]
    assert got.finish_reason == "stop"
    assert got.token_ids == tokens[: first + 1]
    assert got.text == renderer.tokenizer.decode(tokens[:first], skip_special_tokens=True)


def test_groups_give_n_completions_per_conversation(setup):
    model, renderer = setup
    chat = ChatSampler(model, renderer, batch_size=4)
    got = chat.generate(
        CONVERSATIONS[:2],
        key=jax.random.key(3),
        max_new_tokens=10,
        n=3,
        sampling=SamplingParams(temperature=1.0),
    )
    assert [len(c) for c in got] == [3, 3]
    assert len({tuple(c.token_ids) for c in got[0]}) > 1  # different samples of one prompt
    for completion in got[0] + got[1]:
        assert len(completion.logprobs) == len(completion.token_ids)
        assert all(lp <= 0 for lp in completion.logprobs)


def test_records_with_tools_render_their_schemas(setup):
    model, renderer = setup
    tool = {
        "type": "function",
        "function": {"name": "add", "description": "adds", "parameters": {"type": "object"}},
    }
    record = {"messages": [{"role": "user", "content": "Add 2 and 3"}], "tools": [tool]}
    renderer = Renderer(renderer.tokenizer, "qwen")  # chatml has no tools section
    chat = ChatSampler(model, renderer, batch_size=1)
    (completion,) = chat.generate(
        [record], key=jax.random.key(0), max_new_tokens=4, sampling=SamplingParams.greedy()
    )[0]
    assert completion.prompt_tokens == len(renderer.render_prompt(record["messages"], record["tools"]))


@pytest.mark.parametrize(
    ("conversations", "stop", "message"),
    [
        (["hello"], (), "conversation 0: expected a list of messages"),
        ([{"prompt": "hi"}], (), "conversation 0: a record needs a 'messages' or 'prompt' list"),
        (CONVERSATIONS[:1], [""], "stop string '' encodes to no tokens"),
    ],
)
def test_bad_input_is_named(setup, conversations, stop, message):
    model, renderer = setup
    chat = ChatSampler(model, renderer, batch_size=1)
    with pytest.raises(UserError, match=message):
        chat.generate(conversations, key=jax.random.key(0), max_new_tokens=2, stop=stop)


def test_rl_prompt_records_are_conversations(setup):
    model, renderer = setup
    chat = ChatSampler(model, renderer, batch_size=1)
    record = {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "ground_truth": "5"}
    (completion,) = chat.generate(
        [record], key=jax.random.key(0), max_new_tokens=3, sampling=SamplingParams.greedy()
    )[0]
    assert completion.prompt_tokens == len(renderer.render_prompt(record["prompt"]))
