"""Record formats without a registry entry: telling them apart from one record, GSM8K, and canonical input.

``detect_format`` looks at the keys of a source's first readable record:

- exactly ``question`` + ``answer`` -> ``gsm8k``;
- ``instruction`` -> ``alpaca``; ``conversations`` -> ``sharegpt``; ``messages`` -> ``openai`` (OpenAI
  messages, which canonical conversations are a special case of);
- ``prompt`` or ``text`` -> ``canonical`` (already in one of the canonical forms: passed through).

``spec_for_format`` then builds the :class:`DatasetSpec` a ``dataset_info.json`` entry would have given,
reading column and tag names off that record (``from``/``value`` or ``role``/``content`` turns, a
``chosen``/``rejected`` pair, a boolean ``kto_tag`` or ``label`` column).
"""

from __future__ import annotations

import os
from typing import Any

from jaxrl_llm.data.llamafactory import DatasetSpec, make_spec
from jaxrl_llm.data.messages import str_column
from jaxrl_llm.data.records import RecordError

RECORD_FORMATS = ("alpaca", "sharegpt", "openai", "gsm8k", "canonical")


def detect_format(value: Any) -> str | None:
    """The record format ``value`` is written in, or None when its keys say nothing."""
    if not isinstance(value, dict):
        return None
    keys = set(value)
    if keys == {"question", "answer"}:
        return "gsm8k"
    for key, fmt in (("instruction", "alpaca"), ("conversations", "sharegpt"), ("messages", "openai")):
        if key in keys:
            return fmt
    if keys & {"prompt", "text"}:
        return "canonical"
    return None


def spec_for_format(fmt: str, first: Any, path: str) -> DatasetSpec:
    """The spec of an ``alpaca``/``sharegpt``/``openai`` source, with columns and tags as ``first`` (the
    source's first readable record, or ``{}``) spells them.

    Optional columns (``system``, ``history``, ``tools``) are always mapped: a record without them simply
    has none.
    """
    value = first if isinstance(first, dict) else {}
    name = os.path.basename(path.rstrip("/")) or path
    ranking = "chosen" in value and "rejected" in value
    # Only a boolean marks a KTO label: a "label" column is just as often a class name.
    kto = next((k for k in ("kto_tag", "label") if isinstance(value.get(k), bool)), None)
    kto = None if ranking else kto
    if fmt == "alpaca":
        if "instruction" not in value and "text" in value:
            return make_spec(name, path, "alpaca", columns={"prompt": "text"})
        cols = {"prompt": "instruction", "query": "input", "system": "system", "history": "history"}
        cols |= {"tools": "tools", "kto_tag": kto or ""} | ({} if ranking else {"response": "output"})
        return make_spec(name, path, "alpaca", ranking=ranking, columns=cols)
    key = next((k for k in ("conversations", "messages") if k in value), None)
    key = key or ("conversations" if fmt == "sharegpt" else "messages")
    turns = value.get(key)
    first_turn = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
    if "from" in first_turn or ("role" not in first_turn and fmt == "sharegpt"):
        formatting = "sharegpt"
    else:
        formatting = "openai"
    cols = {"messages": key, "system": "system", "tools": "tools", "kto_tag": kto or ""}
    return make_spec(name, path, formatting, ranking=ranking, columns=cols)


def gsm8k_to_prompt(value: Any) -> dict:
    """A GSM8K problem as an RL prompt record: the question as the user turn, the final answer after
    ``####`` (thousands separators removed: ``1,080`` -> ``"1080"``) as ``ground_truth``, the worked
    solution in ``meta``."""
    if not isinstance(value, dict):
        raise RecordError("", "a JSON object", value)
    question = str_column(value, "question", "the problem, a string")
    answer = str_column(value, "answer", "the worked solution, a string")
    final = answer.rpartition("####")[2].strip().replace(",", "") if "####" in answer else ""
    if not final:
        raise RecordError("answer", "a worked solution ending in '#### <final answer>'", answer)
    return {
        "prompt": [{"role": "user", "content": question}],
        "ground_truth": final,
        "meta": {"solution": answer},
    }


def canonical_passthrough(value: Any) -> dict:
    """A record already in a canonical form, unchanged; the schema validates it."""
    if not isinstance(value, dict):
        raise RecordError("", "a JSON object", value)
    return value
