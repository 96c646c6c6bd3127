"""Datasets generated in-process, named by a ``data.path`` of the form ``synthetic:NAME?key=value&...``.

``synthetic:arithmetic?n=4000&digits=2&ops=+-&seed=0`` is ``n`` canonical conversation records, a user
asking ``"What is 47 + 38?"`` and the assistant answering ``"85"``. The same problems come in the other
record kinds, for the preference and RL stages:

- ``synthetic:arithmetic_pref?...``: preference records, the correct answer chosen and a wrong one rejected;
- ``synthetic:arithmetic_kto?...``: unpaired records, a correct answer labelled true or a wrong one labelled
  false (alternating, so half and half);
- ``synthetic:arithmetic_rl?...``: RL prompt records with the answer as ``ground_truth``.

A wrong answer is the correct one plus a nonzero offset in [-10, 10] (so it looks plausible), drawn from
the same seed. Every parameter is optional. The query is split on ``&`` and ``=`` only (no URL decoding), so
``+`` stays ``+``.

A dataset's problems are distinct (drawn without replacement), so the duplicate filter keeps all ``n``.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable
from typing import Any

from jaxrl_llm.data.records import DataError

PREFIX = "synthetic:"
OPS = "+-*"
MAX_DIGITS = 9
_INT = re.compile(r"[+-]?[0-9]+")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _arithmetic_problem(n: int, digits: int, ops: str, seed: int = 0) -> str | None:
    """What is wrong with these ``arithmetic_records`` arguments, or None (any ``seed`` is fine)."""
    if n < 1:
        return f"n={n}: expected an integer >= 1"
    if not 1 <= digits <= MAX_DIGITS:
        return f"digits={digits}: expected an integer in 1..{MAX_DIGITS}"
    if not ops or any(op not in OPS for op in ops) or len(set(ops)) != len(ops):
        return f"ops={ops!r}: expected distinct characters from {OPS!r} (e.g. '+' or '+-*')"
    distinct = len(ops) * 10 ** (2 * digits)
    if n > distinct:
        return f"n={n}: exceeds the {distinct} distinct problems with digits={digits}, ops={ops!r}"
    return None


def arithmetic_records(n: int, *, digits: int = 2, ops: str = "+", seed: int = 0) -> list[dict]:
    """``n`` distinct conversations ``"What is A op B?"`` -> ``"C"``; A and B uniform in
    ``[0, 10**digits - 1]``, the operator uniform over ``ops`` (characters of ``"+-*"``); equal for equal
    arguments. A subtraction may be negative. ValueError on bad arguments."""
    problem = _arithmetic_problem(n, digits, ops)
    if problem is not None:
        raise ValueError(problem)
    size = 10**digits
    records = []
    # Each index is one (op, a, b) triple, so sampling indices without replacement gives distinct problems.
    for index in random.Random(seed).sample(range(len(ops) * size * size), n):
        rest, b = divmod(index, size)
        op_index, a = divmod(rest, size)
        op = ops[op_index]
        records.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} {op} {b}?"},
                    {"role": "assistant", "content": str(_APPLY[op](a, b))},
                ]
            }
        )
    return records


def _wrong(answer: str, rng: random.Random) -> str:
    return str(int(answer) + rng.choice([d for d in range(-10, 11) if d]))


def _split(record: dict) -> tuple[list[dict], dict]:
    """(the user turn as a prompt, the assistant turn) of an arithmetic conversation."""
    user, assistant = record["messages"]
    return [user], assistant


def arithmetic_preference_records(n: int, *, digits: int = 2, ops: str = "+", seed: int = 0) -> list[dict]:
    """The ``arithmetic_records`` problems as preference pairs: correct answer chosen, a wrong one rejected."""
    rng = random.Random(seed + 1)
    out = []
    for record in arithmetic_records(n, digits=digits, ops=ops, seed=seed):
        prompt, answer = _split(record)
        wrong = {"role": "assistant", "content": _wrong(answer["content"], rng)}
        out.append({"prompt": prompt, "chosen": [answer], "rejected": [wrong]})
    return out


def arithmetic_unpaired_records(n: int, *, digits: int = 2, ops: str = "+", seed: int = 0) -> list[dict]:
    """The ``arithmetic_records`` problems as KTO records: even ones answered correctly (label true), odd
    ones wrongly (label false)."""
    rng = random.Random(seed + 1)
    out = []
    for i, record in enumerate(arithmetic_records(n, digits=digits, ops=ops, seed=seed)):
        prompt, answer = _split(record)
        good = i % 2 == 0
        content = answer["content"] if good else _wrong(answer["content"], rng)
        out.append(
            {"prompt": prompt, "completion": [{"role": "assistant", "content": content}], "label": good}
        )
    return out


def arithmetic_prompt_records(n: int, *, digits: int = 2, ops: str = "+", seed: int = 0) -> list[dict]:
    """The ``arithmetic_records`` problems as RL prompts with the answer as ``ground_truth``."""
    out = []
    for record in arithmetic_records(n, digits=digits, ops=ops, seed=seed):
        prompt, answer = _split(record)
        out.append({"prompt": prompt, "ground_truth": answer["content"]})
    return out


@dataclasses.dataclass(frozen=True)
class Generator:
    """A named synthetic dataset: ``make(**params)`` returns its records, all of canonical ``kind``;
    ``defaults`` names every parameter, and its value's type is the parameter's (int or str);
    ``check(**params)`` says what is wrong with them, or None."""

    make: Callable[..., list[dict]]
    kind: str
    defaults: dict[str, int | str]
    check: Callable[..., str | None]


SYNTHETIC: dict[str, Generator] = {
    "arithmetic": Generator(
        make=arithmetic_records,
        kind="conversation",
        defaults={"n": 2000, "digits": 2, "ops": "+", "seed": 0},
        check=_arithmetic_problem,
    ),
    "arithmetic_pref": Generator(
        make=arithmetic_preference_records,
        kind="preference",
        defaults={"n": 2000, "digits": 2, "ops": "+", "seed": 0},
        check=_arithmetic_problem,
    ),
    "arithmetic_kto": Generator(
        make=arithmetic_unpaired_records,
        kind="unpaired",
        defaults={"n": 2000, "digits": 2, "ops": "+", "seed": 0},
        check=_arithmetic_problem,
    ),
    "arithmetic_rl": Generator(
        make=arithmetic_prompt_records,
        kind="prompt",
        defaults={"n": 2000, "digits": 2, "ops": "+", "seed": 0},
        check=_arithmetic_problem,
    ),
}


def is_synthetic(path: Any) -> bool:
    """Whether ``path`` names a synthetic dataset (a string starting with ``synthetic:``)."""
    return isinstance(path, str) and path.startswith(PREFIX)


def parse_synthetic(path: str) -> tuple[str, dict[str, int | str]]:
    """``(name, params)`` of a ``synthetic:NAME?key=value&...`` path, defaults filled in and checked.

    Raises:
      DataError: naming the path and what is allowed (generator names, parameter names, value ranges).
    """
    if not is_synthetic(path):
        raise DataError(f"{path!r}: not a synthetic dataset; expected {PREFIX}NAME?key=value&...")
    name, _, query = path.removeprefix(PREFIX).partition("?")
    if name not in SYNTHETIC:
        raise DataError(f"{path}: unknown synthetic dataset {name!r}; valid: {', '.join(SYNTHETIC)}")
    defaults = SYNTHETIC[name].defaults
    params = dict(defaults)
    given: set[str] = set()
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if key not in defaults:
            raise DataError(
                f"{path}: unknown parameter {key!r} of {PREFIX}{name}; valid: {', '.join(defaults)}"
            )
        if not eq:
            raise DataError(f"{path}: parameter {key!r} has no value; expected {key}=VALUE")
        if key in given:
            raise DataError(f"{path}: parameter {key!r} is given twice")
        given.add(key)
        if isinstance(defaults[key], int):
            if not _INT.fullmatch(value):
                raise DataError(f"{path}: {key}={value!r}: expected an integer")
            params[key] = int(value)
        else:
            params[key] = value
    problem = SYNTHETIC[name].check(**params)
    if problem is not None:
        raise DataError(f"{path}: {problem}")
    return name, params


def synthetic_records(path: str) -> list[dict]:
    """The records a ``synthetic:`` path names; DataError when the path is not valid."""
    name, params = parse_synthetic(path)
    return SYNTHETIC[name].make(**params)
