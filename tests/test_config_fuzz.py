"""Fuzzing the field table: random override strings for random keys, through ``parse_args`` and ``main``.

A bad value (wrong type, out of range, nan/inf, huge, empty, unicode, JSON garbage, ``none`` for a key that
is not nullable), an unknown key or a section given a value must raise ``ConfigError`` whose problem line
names the key and the value (``main`` exits 2 with no traceback); no other exception may escape. A random
valid value must be accepted. The generators read ``FIELDS``, so a new key is fuzzed without a change here;
a new key whose valid values depend on another key needs an entry in ``_COMPANIONS`` or ``_VALID``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest

from jaxrl_llm.config import FIELDS, ConfigError, Field, parse_args
from jaxrl_llm.config.validate import INT_LIMIT
from jaxrl_llm.train import __main__ as train_main
from jaxrl_llm.train import stages

SEED = 20240611
CASES = 300
SECTIONS = sorted({f.key.rpartition(".")[0] for f in FIELDS} - {""})
GARBAGE = ["", " ", "abc", "é中文", "\U0001f600", "0x1f", "1,5", "[", "{}", "--", "\t"]

# (raw override, the text its problem line must show: the value as the message prints it; None = the key's
# problem line need only name the key, as for an entry of a list)
Case = tuple[str, str | None]


def _number_cases(field: Field) -> list[Case]:
    """Values of the right type outside the key's range (or its 32-bit limit)."""
    cases: list[Case] = []
    kind = field.type
    step = 1 if kind is int else 0.25
    if field.lo is not None:
        below = [field.lo - step, field.lo - 1000 * step] + ([field.lo] if field.lo_open else [])
        cases += [(repr(kind(v)), repr(kind(v))) for v in below if v not in field.special]
    if field.hi is not None:
        above = [field.hi + step, field.hi + 1000 * step] + ([field.hi] if field.hi_open else [])
        cases += [(repr(kind(v)), repr(kind(v))) for v in above if v not in field.special]
    if kind is int:
        huge = [INT_LIMIT, 10**30, -(10**25)]
        cases += [(str(v), str(v)) for v in huge]
        cases += [("1e400", "'1e400'"), ("1.5", "'1.5'"), ("nan", "'nan'"), ("inf", "'inf'")]
    else:
        cases += [("nan", "nan"), ("inf", "inf"), ("-inf", "-inf"), ("1e999", "inf"), ("true", "'true'")]
    return cases


def _list_cases(field: Field) -> list[Case]:
    cases: list[Case] = [
        (text, repr(text)[:20])
        for text in ("[", "{}", "3", '"x"', "nan", "", "[1,]", '{"name": "length"}', "[" * 3000)
    ]
    if field.key == "rollout.stop":
        cases += [("[1]", "=1"), ("[null]", "=None"), ('[""]', "=''"), ('["a", ["b"]]', "=['b']")]
    if field.key == "reward.functions":
        cases += [
            ("[1]", "got 1"),
            ('[{"nam": "length"}]', "nam"),
            ('[{"name": "nope"}]', "'nope'"),
            ('[{"name": "length", "weight": "x"}]', "'x'"),
            ('[{"name": "length", "params": 3}]', None),
            ('[{"name": "length", "params": {"nope": 1}}]', "nope"),
        ]
    return cases


def invalid_cases(field: Field) -> list[Case]:
    """Every kind of bad override string for ``field``."""
    choices = field.allowed_choices()
    cases: list[Case] = []
    if not field.nullable and (field.type is not str or choices is not None and "none" not in choices):
        cases.append(("none", "'none'"))
    if field.type in (int, float):
        cases += [(g, repr(g)) for g in GARBAGE] + _number_cases(field)
    elif field.type is bool:
        cases += [(g, repr(g)) for g in [*GARBAGE, "maybe", "2", "tru", "-1"]]
    elif field.type is list:
        cases += _list_cases(field)
    elif choices is not None:
        cases += [(g, repr(g)) for g in GARBAGE if g not in choices]
        cases += [(f"{c}x", repr(f"{c}x")) for c in choices[:3]]
    cases.append(("a\x00b", repr("a\x00b")) if field.type is str else ("1\x00", repr("1\x00")))
    return cases


_REWARD = '[{"name": "length"}]'
# Keys whose valid values another key constrains, with the base config's other values.
_VALID: dict[str, Callable[[random.Random], str]] = {
    "train.steps": lambda rng: str(rng.choice([100, 1000, 10**6, INT_LIMIT - 1])),  # >= warmup (100)
    "optimizer.warmup_steps": lambda rng: str(rng.randint(0, 1000)),  # <= train.steps (1000)
    "train.grad_accum_steps": lambda rng: rng.choice(["1", "2", "4", "8"]),  # divides train.batch_size (8)
    "train.seq_len": lambda rng: str(rng.randint(2, 512)),  # <= llama-tiny's max_seq_len
    "model.max_seq_len": lambda rng: rng.choice(["256", "4096", "none"]),  # >= train.seq_len (256)
    "model.num_heads": lambda rng: str(2 * rng.randint(1, 32)),  # a multiple of llama-tiny's 2 KV heads
    "model.num_kv_heads": lambda rng: rng.choice(["1", "2", "4", "none"]),  # divides its 4 heads
    "parallel.fsdp": lambda rng: str(rng.randint(1, 64)),  # parallel.data is already -1
    "parallel.tensor": lambda rng: str(rng.randint(1, 64)),
    "model.path": lambda rng: "",  # a checkpoint is read at validation (tests/test_hf_io_errors.py)
    "data.dataset_info": lambda rng: "",  # an existing file, and data.name with it (tests/test_config.py)
    "data.name": lambda rng: "",
    "optimizer.freeze": lambda rng: rng.choice(["", "embed", "blocks/attn|lm_head", "^final_norm$"]),
    "rollout.stop": lambda rng: rng.choice(["[]", '["</s>"]', '["\\n\\nUser:", "ü"]']),
    "reward.functions": lambda rng: rng.choice(["[]", _REWARD, '[{"name": "math_verify", "weight": 0.5}]']),
    "canary.prompts": lambda rng: rng.choice(["[]", '["What is 2 + 2?"]']),
    "canary.reward": lambda rng: "[]",
    "observe.report_to": lambda rng: rng.choice(["tensorboard", "tensorboard,wandb", "wandb"]),
}
# Overrides a valid value needs beside it: (key, predicate on the raw value, the other overrides).
_COMPANIONS: list[tuple[str, Callable[[str], bool], list[str]]] = [
    ("stage", lambda v: v in ("grpo", "ppo"), [f"--config.reward.functions={_REWARD}"]),
    ("train.eval_generate", lambda v: v != "0", ["--config.data.eval_split=0.1"]),
    (
        "parallel.num_processes",
        lambda v: v not in ("1", "none"),
        ["--config.parallel.coordinator_address=h:1"],
    ),
    ("canary.every", lambda v: v != "0", ['--config.canary.prompts=["Hi"]']),
]


def valid_value(field: Field, rng: random.Random, tmp: str) -> str:
    if field.key in _VALID:
        return _VALID[field.key](rng)
    if field.nullable and rng.random() < 0.2:
        return rng.choice(["none", "None", "null"])
    choices = field.allowed_choices()
    if choices is not None:
        return str(rng.choice(choices))
    if field.type is bool:
        return rng.choice(["true", "false", "yes", "no", "1", "0", "True", " FALSE "])
    if field.type is int:
        lo = int(field.lo) if field.lo is not None else 0
        hi = int(field.hi) if field.hi is not None else lo + 1000
        return str(rng.choice([lo, hi, rng.randint(lo, hi), *field.special]))
    if field.type is float:
        lo = field.lo if field.lo is not None else -10.0
        hi = field.hi if field.hi is not None else lo + 100.0
        value = rng.uniform(lo, hi)
        value = value if lo < value < hi else (lo + hi) / 2  # inside even an open bound
        return rng.choice(
            [repr(value), f"  {value!r}  ", str(int(value)) if value == int(value) else repr(value)]
        )
    if field.type is list:
        return "[]"
    if field.key in ("run_dir", "tokenizer.path"):
        return tmp  # an existing directory
    return rng.choice(["", "x", "données/数据 1.jsonl", "gs://bucket/path", "h:1234"])


def _overrides(key: str, raw: str) -> list[str]:
    extra = [arg for k, when, args in _COMPANIONS if k == key and when(raw) for arg in args]
    return [f"--config.{key}={raw}", *extra]


def _check_invalid(args: list[str], key: str, shown: str | None) -> str | None:
    """None when ``args`` raise a ConfigError naming ``key`` (and ``shown``); else what went wrong."""
    try:
        parse_args(args)
    except ConfigError as err:
        lines = [p for p in err.problems if key in p]
        if not lines:
            return f"{args!r}: no problem line names {key}: {err.problems}"
        if shown is not None and not any(shown in p for p in lines):
            return f"{args!r}: the problem line does not show {shown!r}: {lines}"
        return None
    except Exception as err:  # noqa: BLE001  (the point of the test)
        return f"{args!r}: raised {type(err).__name__}: {err}"
    return f"{args!r}: accepted"


def test_random_invalid_overrides_name_the_key_and_value():
    rng = random.Random(SEED)
    failures = []
    for _ in range(CASES):
        field = rng.choice(FIELDS)
        raw, shown = rng.choice(invalid_cases(field))
        if problem := _check_invalid([f"--config.{field.key}={raw}"], field.key, shown):
            failures.append(problem)
    assert not failures, "\n".join(failures)


def test_every_key_rejects_none_garbage_and_nul():
    """Not left to chance: the first cases of every key (none, garbage, out of range) once each."""
    failures = []
    for field in FIELDS:
        for raw, shown in invalid_cases(field)[:4] + invalid_cases(field)[-1:]:
            if problem := _check_invalid([f"--config.{field.key}={raw}"], field.key, shown):
                failures.append(problem)
    assert not failures, "\n".join(failures)


def test_random_valid_overrides_are_accepted(tmp_path):
    rng = random.Random(SEED + 1)
    failures = []
    for _ in range(CASES):
        field = rng.choice(FIELDS)
        args = _overrides(field.key, valid_value(field, rng, str(tmp_path)))
        try:
            parse_args(args)
        except Exception as err:  # noqa: BLE001
            failures.append(f"{args!r}: {type(err).__name__}: {err}")
    assert not failures, "\n".join(failures)


def _typo(key: str, rng: random.Random) -> str:
    i = rng.randrange(len(key))
    edits = [
        key[:i] + key[i + 1 :],  # a dropped letter
        key[:i] + rng.choice("aeiouxz_") + key[i:],  # an added one
        key + rng.choice(["s", "_", ".x", "é"]),
        key.replace(".", "_", 1),
        key.upper(),
    ]
    return rng.choice(edits)


def test_unknown_keys_sections_and_nested_keys():
    rng = random.Random(SEED + 2)
    known = {f.key for f in FIELDS} | set(SECTIONS)
    failures = []
    for _ in range(CASES // 2):
        key = _typo(rng.choice(FIELDS).key, rng)
        if key in known or any(k.startswith(f"{key}.") for k in known) or not key.strip("."):
            continue
        if problem := _check_invalid([f"--config.{key}=1"], key, "unknown key"):
            failures.append(problem)
    for section in SECTIONS:  # a section given a value
        raw = rng.choice(["1", "none", "{}", '{"lr": 1}'])
        if problem := _check_invalid([f"--config.{section}={raw}"], section, "is a section"):
            failures.append(problem)
    for field in rng.sample(FIELDS, 10):  # a key used as a section
        if problem := _check_invalid([f"--config.{field.key}.x=1"], f"{field.key}.x", "unknown key"):
            failures.append(problem)
    assert not failures, "\n".join(failures)


def test_several_bad_overrides_are_all_named_at_once():
    rng = random.Random(SEED + 3)
    failures = []
    for _ in range(30):
        fields = rng.sample(FIELDS, 4)
        picked = [(f, *rng.choice(invalid_cases(f))) for f in fields]
        args = [f"--config.{f.key}={raw}" for f, raw, _ in picked]
        try:
            parse_args(args)
            failures.append(f"{args!r}: accepted")
        except ConfigError as err:
            missing = [f.key for f, _, _ in picked if not any(f.key in p for p in err.problems)]
            if missing:
                failures.append(f"{args!r}: {missing} not named in {err.problems}")
        except Exception as err:  # noqa: BLE001
            failures.append(f"{args!r}: raised {type(err).__name__}: {err}")
    assert not failures, "\n".join(failures)


def test_main_exits_2_without_traceback_and_runs_valid_configs(monkeypatch, capsys, tmp_path):
    ran = []
    monkeypatch.setattr(stages, "run_stage", lambda cfg: ran.append(cfg) or 0)
    rng = random.Random(SEED + 4)
    for _ in range(40):
        field = rng.choice(FIELDS)
        raw, _ = rng.choice(invalid_cases(field))
        assert train_main.main([f"--config.{field.key}={raw}"]) == 2, (field.key, raw)
        err = capsys.readouterr().err
        assert "configuration error" in err and field.key in err and "Traceback" not in err
        args = _overrides(field.key, valid_value(field, rng, str(tmp_path)))
        assert train_main.main(args) == 0, (args, capsys.readouterr().err)
        capsys.readouterr()
    assert len(ran) == 40


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config.seed=" + "9" * 5000], "... (5002 characters)"),  # named, not echoed whole
        (["--config.rollout.stop=" + "[" * 100_000], "nested too deeply"),  # was a RecursionError
        (["--config.optimizer.freeze=" + "(" * 2000 + ")" * 2000], "not a usable regular expression"),
        (["--config.optimizer.freeze=a{4294967296}"], "not a usable regular expression"),
        (["--config.model.path=" + "a" * 5000], "cannot be read (File name too long)"),  # was an OSError
        (["--config.run_dir=" + "a" * 5000], "cannot be created (File name too long)"),
        (["--config.run_dir=a\x00b"], "contains a NUL character"),  # was a ValueError at os.makedirs
        (["--config.seed=99999999999999999999"], "fit in 32 bits"),  # was an OverflowError in jax.random
        (["--config.train.steps=1e30"], "fit in 32 bits"),
        (["--config.reward.host_timeout_s=1e300"], "must be float in (0, 86400]"),  # overflowed a wait
        (["--config.rollout.stop=[1]"], "rollout.stop[0]=1: each stop string must be a non-empty string"),
        (
            ["--config.stage=grpo", '--config.reward.functions=[{"name": "nope"}]'],
            "reward.functions[0]: unknown reward 'nope'",
        ),
    ],
    ids=lambda v: json.dumps(v)[:40] if isinstance(v, list) else None,
)
def test_what_the_fuzzer_found(args, expected):
    with pytest.raises(ConfigError) as err:
        parse_args(args)
    assert any(expected in p for p in err.value.problems), err.value.problems


def test_run_dir_below_a_file_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=f"cannot be created, {tmp_path / 'file'} is a file"):
        parse_args([f"--config.run_dir={tmp_path / 'file' / 'run'}"])
