"""The reward layer's core: device rewards by hand and under jit/vmap, host format and tool-call rewards,
weighted combination and per-component metrics, failure fallbacks, config errors, a learned reward model."""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.reward import (
    REGISTRY,
    RewardError,
    RewardModel,
    RewardSet,
    SampleArrays,
    arrays_for,
    get_reward,
    parse_specs,
    register,
)

EOS = 2


def sample(completion, answer=(), width=12, prompt=(7, 8)):
    """One SampleArrays row (no batch axis) from token lists."""
    ids = np.zeros(width, np.int32)
    ids[: len(completion)] = completion
    ans = np.zeros(8, np.int32)
    ans[: len(answer)] = answer
    return SampleArrays(
        prompt_ids=jnp.asarray(prompt, jnp.int32),
        prompt_mask=jnp.ones(len(prompt), bool),
        completion_ids=jnp.asarray(ids),
        completion_mask=jnp.arange(width) < len(completion),
        answer_ids=jnp.asarray(ans),
        answer_mask=jnp.arange(8) < len(answer),
    )


def stack(samples):
    return jax.tree.map(lambda *a: jnp.stack(a), *samples)


def device_value(name, s, **params):
    fn = get_reward(name)
    params = fn.bind(params)
    if fn.prepare:
        params = fn.prepare(params, None)
    return float(fn.fn(s, **params))


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ([5, 6, EOS], [5, 6], 1.0),  # EOS ignored
        ([5, 6], [5, 6], 1.0),
        ([5, 7, EOS], [5, 6], 0.0),
        ([5, 6, 6, EOS], [5, 6], 0.0),  # longer
        ([5, EOS], [5, 6], 0.0),  # shorter
        ([EOS, 5, 6], [5, 6], 1.0),
        ([5, 6], [], 0.0),  # no ground truth
    ],
)
def test_answer_match(completion, answer, expected):
    assert device_value("answer_match", sample(completion, answer), ignore_ids=[EOS]) == expected


@pytest.mark.parametrize(
    ("length", "expected"), [(0, 0.0), (6, 0.0), (7, -0.25), (8, -0.5), (10, -1.0), (12, -1.0)]
)
def test_overlong_is_dapos_soft_punishment(length, expected):
    # max_length 10, cache 4: free up to 6 tokens, then linear to -1 at 10 (DAPO eq. 13).
    got = device_value("overlong", sample([3] * length), max_length=10, cache_length=4)
    assert got == pytest.approx(expected)


def test_repetition_and_length():
    # 1 2 3 1 2 3 has the 3-grams 123 231 312 123: one of four repeats an earlier one.
    assert device_value("repetition", sample([1, 2, 3, 1, 2, 3]), n=3, max_penalty=-1.0) == pytest.approx(
        -0.25
    )
    assert device_value("repetition", sample([1, 2, 3, 4]), n=3) == 0.0
    assert device_value("repetition", sample([1, 2]), n=3) == 0.0  # shorter than n
    assert device_value("repetition", sample([4, 4, 4, 4]), n=1, max_penalty=-2.0) == pytest.approx(-1.5)
    assert device_value("length", sample([1] * 5), coef=-0.1, free_tokens=2) == pytest.approx(-0.3)


@pytest.mark.parametrize(
    ("completion", "partial", "expected"),
    [
        ([10, 1, 11, 12, 13, 1, 14], False, 1.0),
        ([12, 13, 10, 11, 14], False, 0.0),  # answer before think
        ([10, 11, 12, 13], False, 0.0),  # no closing marker
        ([10, 11, 12, 13], True, 0.75),
        ([10, 1, 1], True, 0.25),
        ([12, 1], True, 0.0),  # the first marker missing: nothing in order
    ],
)
def test_format_tokens_in_order(completion, partial, expected):
    markers = [[10], [11], [12, 13], [14]]
    assert device_value("format_tokens", sample(completion), markers=markers, partial=partial) == expected


def test_device_rewards_jit_and_vmap_equal_per_sample_calls():
    specs = [
        {"name": "answer_match", "params": {"ignore_ids": [EOS]}},
        {"name": "overlong", "params": {"max_length": 10, "cache_length": 4}},
        {"name": "repetition"},
        {"name": "length", "params": {"coef": -0.1}},
        {"name": "format_tokens", "params": {"markers": [[10], [11]]}},
    ]
    rewards = RewardSet(specs)
    rs = np.random.RandomState(0)
    rows = [sample(list(rs.randint(3, 15, rs.randint(0, 12))), [5, 6]) for _ in range(6)]
    rows[0] = sample([5, 6, EOS], [5, 6])
    batch = stack(rows)
    got = jax.jit(rewards.device_components)(batch)
    for spec in specs:
        want = [device_value(spec["name"], r, **spec.get("params", {})) for r in rows]
        np.testing.assert_allclose(np.asarray(got[spec["name"]]), want, rtol=1e-6)
    # A [groups, n] layout (vmapped twice) gives the same values.
    grouped = jax.tree.map(lambda a: a.reshape(3, 2, *a.shape[1:]), batch)
    again = jax.jit(rewards.device_components)(grouped)
    for key in got:
        np.testing.assert_array_equal(np.asarray(again[key]).reshape(-1), np.asarray(got[key]))
    assert float(got["answer_match"][0]) == 1.0


def test_text_markers_are_encoded_with_the_tokenizer():
    class Tok:
        def encode(self, text, add_special_tokens=False):
            return {"<think>": [10], "</think>": [11]}[text]

    rewards = RewardSet(
        [{"name": "format_tokens", "params": {"markers": ["<think>", "</think>"]}}], tokenizer=Tok()
    )
    assert rewards.params["format_tokens"]["markers"] == ((10,), (11,))
    with pytest.raises(RewardError, match="needs the policy's tokenizer"):
        RewardSet([{"name": "format_tokens", "params": {"markers": ["<think>"]}}])


TOOLS = [
    {
        "name": "add",
        "description": "adds",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    }
]


@pytest.mark.parametrize(
    ("completion", "require", "expected"),
    [
        ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', False, 1.0),
        ('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>', False, 1.0),
        ('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>', False, 0.0),  # missing b
        ('<tool_call>{"name": "add", "arguments": {"a": "1", "b": 2}}</tool_call>', False, 0.0),  # wrong type
        ('<tool_call>{"name": "mul", "arguments": {"a": 1, "b": 2}}</tool_call>', False, 0.0),  # undeclared
        ("<tool_call>{not json}</tool_call>", False, 0.0),
        ("<tool_call>" + "[" * 100_000 + "</tool_call>", False, 0.0),  # nested past the JSON parser's depth
        ("The answer is 3.", False, None),  # no call: does not apply
        ("The answer is 3.", True, 0.0),
    ],
)
def test_tool_call_validity_against_the_records_schemas(completion, require, expected):
    fn = get_reward("tool_call_valid")
    assert fn.fn(completion, {"tools": TOOLS}, require_call=require) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>2+2 is 4</think><answer>4</answer>", 1.0),
        ("  <think>\nmulti\nline</think>\n<answer>4</answer>\n", 1.0),
        ("<answer>4</answer>", 0.0),
        ("<think>a</think><answer>4</answer> trailing", 0.0),
        ("<think>a<think>b</think><answer>4</answer>", 0.0),
        ("<answer>4</answer><think>a</think>", 0.0),
    ],
)
def test_think_answer_format(completion, expected):
    assert get_reward("think_answer_format").fn(completion, {}) == expected


def test_regex_and_math_host_rewards():
    regex = get_reward("format_regex").fn
    assert regex("Answer: 42", {}, pattern=r"Answer: \d+", mode="fullmatch") == 1.0
    assert regex("so Answer: 42", {}, pattern=r"Answer: \d+", mode="search") == 1.0
    assert regex("so Answer: 42", {}, pattern=r"Answer: \d+", mode="fullmatch") == 0.0
    math_fn = get_reward("math_verify").fn
    assert math_fn("... so the answer is 1,234.", {"ground_truth": "1234"}) == 1.0
    assert math_fn("The answer is 5", {"ground_truth": "6"}) == 0.0


def records_and_completions():
    completions = ["Answer: 1", "Answer: 2", "nope", "Answer: 4", "x", "y"]
    records = [{"ground_truth": str(i + 1)} for i in range(6)]
    return completions, records


def test_weighted_total_and_per_component_metrics():
    completions, records = records_and_completions()
    lengths = [3, 5, 1, 4, 2, 2]
    arrays = stack([sample([7] * n) for n in lengths])
    rewards = RewardSet(
        [
            {"name": "length", "weight": 0.5, "params": {"coef": -0.1}},
            {"name": "format_regex", "weight": 2.0, "params": {"pattern": r"Answer: \d+"}},
            {"name": "math_verify", "weight": 1.0},
        ]
    )
    result = rewards(completions, records, arrays)
    fmt = np.array([1, 1, 0, 1, 0, 0], np.float32)
    length = -0.1 * np.array(lengths, np.float32)
    np.testing.assert_allclose(result.components["format_regex"], fmt)
    np.testing.assert_allclose(result.components["length"], length, rtol=1e-6)
    np.testing.assert_allclose(result.components["math_verify"], [1, 1, 0, 1, 0, 0])
    np.testing.assert_allclose(
        result.total, 0.5 * length + 2 * fmt + result.components["math_verify"], rtol=1e-6
    )
    metrics = result.metrics(group_size=2)
    assert metrics["reward/format_regex/mean"] == pytest.approx(0.5)
    assert metrics["reward/format_regex/min"] == 0.0 and metrics["reward/format_regex/max"] == 1.0
    assert metrics["reward/format_regex/std"] == pytest.approx(0.5)
    # Groups (rows 0-1, 2-3, 4-5): format is flat in groups 0 and 2, length only in group 2.
    assert metrics["reward/format_regex/zero_std_groups"] == pytest.approx(2 / 3)
    assert metrics["reward/length/zero_std_groups"] == pytest.approx(1 / 3)
    assert metrics["reward/total/zero_std_groups"] == pytest.approx(1 / 3)
    assert metrics["reward/total/mean"] == pytest.approx(float(result.total.mean()))
    rows = result.samples(completions)
    assert rows[2] == {
        "total": pytest.approx(float(result.total[2])),
        "in_loss": True,
        "length": pytest.approx(-0.1),
        "format_regex": 0.0,
        "math_verify": 0.0,
        "completion": "nope",
    }


def _register_test_rewards():
    if "_test_flaky" in REGISTRY:
        return

    @register("_test_flaky", "host")
    def flaky(completion, record, *, mode: str = "ok"):
        """Fails in the way ``record['fail']`` says."""
        how = record.get("fail")
        if how == "raise":
            raise ValueError("boom")
        if how == "nan":
            return math.nan
        if how == "sleep":
            time.sleep(1.5)
        if how == "none":
            return None
        if how == "text":
            return "1.0"
        return 1.0


@pytest.mark.parametrize("on_error", ["zero", "exclude"])
def test_failing_host_rewards_get_the_fallback_and_are_counted(on_error):
    _register_test_rewards()
    records = [{"fail": f} for f in (None, "raise", "nan", "sleep", "none", "text")]
    rewards = RewardSet(
        [{"name": "_test_flaky", "weight": 2.0}, {"name": "format_regex", "params": {"pattern": "ok"}}],
        on_error=on_error,
        host_timeout_s=0.5,
        workers=6,
    )
    result = rewards(["ok"] * 6, records)
    values, applies = result.components["_test_flaky"], result.applies["_test_flaky"]
    np.testing.assert_array_equal(applies, [True, False, False, False, False, False])
    np.testing.assert_array_equal(values, [1, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(result.total, [3, 1, 1, 1, 1, 1])  # the other component still counts
    errors = result.errors["_test_flaky"]
    assert errors["count"] == 4  # raise, nan, timeout, non-number; "none" (does not apply) is no error
    text = " ".join(e for _, e in errors["first"])
    assert (
        "ValueError: boom" in text and "nan" in text and "timed out" in text and "not a finite number" in text
    )
    expected_mask = (
        [True, True, True, True, True, True]
        if on_error == "zero"
        else [True, False, False, False, True, False]
    )
    np.testing.assert_array_equal(result.loss_mask, expected_mask)
    metrics = result.metrics()
    assert metrics["reward/_test_flaky/errors"] == 4.0
    assert metrics["reward/_test_flaky/applies"] == pytest.approx(1 / 6)
    assert metrics["reward/_test_flaky/mean"] == 1.0  # over the samples it applies to


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (
            [{"name": "nope"}],
            r"reward.functions\[0\]: unknown reward 'nope'; valid: .*answer_match \(device\)",
        ),
        (
            [{"name": "length", "params": {"coeff": 1}}],
            r"unknown parameter\(s\) coeff; valid: coef, free_tokens",
        ),
        ([{"name": "length", "weight": "heavy"}], "weight 'heavy' is not a number"),
        ([{"name": "length", "wieght": 1}], r"unknown key\(s\) wieght; valid: name, weight, params, label"),
        ([{"name": "length"}, {"name": "length"}], "listed twice: give each a distinct 'label'"),
        ([], "no reward functions configured"),
        ({"name": "length"}, "expected a list"),
        ([{"weight": 1}], "missing 'name'"),
    ],
)
def test_config_mistakes_are_named(items, message):
    with pytest.raises(RewardError, match=message):
        parse_specs(items)


def test_a_function_twice_with_labels():
    specs = parse_specs(
        [
            {"name": "format_regex", "label": "has_answer", "params": {"pattern": "A", "mode": "search"}},
            {"name": "format_regex", "label": "has_b", "params": {"pattern": "B", "mode": "search"}},
        ]
    )
    result = RewardSet(specs)(["AB", "A"], [{}, {}])
    np.testing.assert_array_equal(result.components["has_answer"], [1, 1])
    np.testing.assert_array_equal(result.components["has_b"], [1, 0])


def test_device_rewards_need_arrays_and_arrays_for_encodes_answers():
    rewards = RewardSet([{"name": "answer_match"}])
    with pytest.raises(RewardError, match="pass the completions' token arrays"):
        rewards(["x"], [{}])

    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [int(c) + 3 for c in text]

    arrays = arrays_for(
        np.ones((2, 2)),
        np.ones((2, 2)),
        np.array([[4, 5, 0], [4, 6, 0]]),
        np.array([[1, 1, 0], [1, 1, 0]]),
        [{"ground_truth": "12"}, {"ground_truth": "12"}],
        Tok(),
        answer_len=4,
    )
    np.testing.assert_array_equal(np.asarray(arrays.answer_ids[0]), [4, 5, 0, 0])
    np.testing.assert_array_equal(rewards(["a", "b"], [{}, {}], arrays).components["answer_match"], [1, 0])


@pytest.mark.slow
def test_reward_model_scores_on_device_and_combines(tmp_path):
    from jaxrl_llm.models import create_model, get_preset, save_hf
    from jaxrl_llm.models.transformer import sequence_scores
    from jaxrl_llm.render import Renderer, load_tokenizer
    from tests.fixtures_tokenizers import make_hf_tokenizer_dir

    where = make_hf_tokenizer_dir(tmp_path / "rm")
    tok = load_tokenizer(where)
    rm = create_model(get_preset("llama-tiny", vocab_size=tok.vocab_size), seed=3, head="score")
    save_hf(rm, where)
    records = [{"prompt": [{"role": "user", "content": q}]} for q in ("hello", "what is 2+2?", "bye")]
    completions = ["hi there", "4", "see you"]
    rewards = RewardSet(
        [
            {
                "name": "reward_model",
                "weight": 0.5,
                "params": {"path": str(where), "template": "chatml", "batch_size": 2},
            },
            {"name": "format_regex", "params": {"pattern": r"\d", "mode": "search"}},
        ]
    )
    result = rewards(completions, records)
    renderer = Renderer(tok, "chatml")
    for i, (record, completion) in enumerate(zip(records, completions, strict=True)):
        ids = renderer.render_ids([*record["prompt"], {"role": "assistant", "content": completion}])
        scores = rm(jnp.asarray(ids)[None], attention_mask=jnp.ones((1, len(ids)), jnp.int32))
        want = float(sequence_scores(scores, jnp.ones((1, len(ids)), jnp.int32))[0])
        assert result.components["reward_model"][i] == pytest.approx(want, abs=1e-5)
    np.testing.assert_allclose(result.total, 0.5 * result.components["reward_model"] + [0, 1, 0], rtol=1e-6)
    with pytest.raises(RewardError, match="set params.path"):
        RewardModel.load("")


def test_from_the_config_and_its_command_line_json():
    from jaxrl_llm.config import validate
    from jaxrl_llm.config.cli import apply_overrides
    from jaxrl_llm.config.schema import base_config

    functions = '[{"name": "format_regex", "weight": 2, "params": {"pattern": "ok"}}, {"name": "length"}]'
    cfg = apply_overrides(base_config(), {"reward.functions": functions, "reward.on_error": "exclude"})
    validate(cfg)
    rewards = RewardSet.from_config(cfg)
    assert [(s.name, s.weight) for s in rewards.specs] == [("format_regex", 2.0), ("length", 1.0)]
    assert rewards.on_error == "exclude" and rewards.params["format_regex"]["pattern"] == "ok"
    from jaxrl_llm.config import ConfigError

    with pytest.raises(ConfigError, match="reward.functions=.*expected a JSON list"):
        apply_overrides(base_config(), {"reward.functions": "{not json"})


def test_code_exec_reads_the_records_tests_also_from_meta():
    code = get_reward("code_exec").fn
    answer = "```python\ndef add(a, b):\n    return a + b\n```"
    tests = ["assert add(2, 3) == 5", "assert add(1, 1) == 3"]
    assert code(answer, {"tests": tests}, timeout_s=10) == 0.5
    assert code(answer, {"prompt": [], "meta": {"tests": tests}}, timeout_s=10) == 0.5
    with pytest.raises(KeyError, match="no 'tests' field"):
        code(answer, {"prompt": []})
