"""LLaMA-Factory's dataset registry (``dataset_info.json``) and its ``alpaca`` format -> canonical records.

A registry entry names a file and says how to read it: ``formatting`` (``alpaca`` or ``sharegpt``; the
``openai`` variant is ``sharegpt`` with role/content tags), ``ranking`` for preference pairs, a ``columns``
mapping from LLaMA-Factory's roles to the file's keys and, for ``sharegpt``, ``tags`` naming the roles. The
defaults are LLaMA-Factory's own (``data/README.md``). :meth:`DatasetInfo.entry` turns an entry into a
:class:`DatasetSpec`, and :func:`convert` turns one record into the canonical kind the spec yields:

- ``ranking`` -> ``preference``; a ``kto_tag`` column -> ``unpaired``;
- alpaca whose only column is ``prompt`` (pre-training, ``{"prompt": "text"}``) -> ``text``, unless the
  file's first record has the default response column ``output`` (then ``conversation``);
- anything else -> ``conversation``.

Where this departs from LLaMA-Factory: remote entries (``hf_hub_url``, ...) are refused rather than
downloaded, and a local ``file_name`` beside them is used instead; multimodal columns are refused; records
LLaMA-Factory would silently skip (bad role order, wrong types) raise :class:`RecordError` instead, and role
order itself is left to the schema and the filters. Ranking entries default ``chosen``/``rejected`` columns
to those names. Unknown ``columns``/``tags`` keys are refused (LLaMA-Factory ignores them, so a typo would
read the default column); the hub options ``subset``, ``split``, ``folder`` and ``num_samples`` (sampling
belongs to the pipeline) are ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from typing import Any

from jaxrl_llm.data.messages import expect_list, expect_str, kto_label, optional_str, parse_tools, str_column
from jaxrl_llm.data.readers import load_json_file
from jaxrl_llm.data.records import DataError, RecordError, listed
from jaxrl_llm.data.sharegpt import sharegpt_to_canonical
from jaxrl_llm.data.spec import DatasetSpec

FORMATTINGS = ("alpaca", "sharegpt", "openai")
KNOWN_COLUMNS = (
    "prompt", "query", "response", "history", "messages", "system", "tools",
    "images", "videos", "audios", "chosen", "rejected", "kto_tag",
)  # fmt: skip
KNOWN_TAGS = (
    "role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag",
)  # fmt: skip
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
SHAREGPT_COLUMNS = {"messages": "conversations"}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
# OpenAI messages: LLaMA-Factory spells this out per entry; `tool` is OpenAI's name for a tool result.
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function_call",
    "system_tag": "system",
}
_MEDIA = ("images", "videos", "audios")
_REMOTE = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


def spec_kind(formatting: str, ranking: bool, columns: Mapping[str, str]) -> str:
    """The canonical kind of an entry, from its *explicit* columns (before defaults are filled in)."""
    if ranking:
        return "preference"
    if columns.get("kto_tag"):
        return "unpaired"
    if formatting == "alpaca" and set(columns) == {"prompt"}:
        # LLaMA-Factory's pre-training entries map only the document column (c4_demo: {"prompt": "text"}).
        return "text"
    return "conversation"


def make_spec(
    name: str,
    path: str,
    formatting: str,
    *,
    ranking: bool = False,
    columns: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
) -> DatasetSpec:
    """A spec with LLaMA-Factory's defaults filled in around the given ``columns`` and ``tags``."""
    explicit = {k: v for k, v in (columns or {}).items() if v}
    kind = spec_kind(formatting, ranking, explicit)
    if formatting == "alpaca":
        base = {"prompt": explicit.get("prompt", "instruction")} if kind == "text" else dict(ALPACA_COLUMNS)
        tag_map: dict[str, str] = {}
    else:
        base = dict(SHAREGPT_COLUMNS) if formatting == "sharegpt" else {"messages": "messages"}
        tag_map = {**(SHAREGPT_TAGS if formatting == "sharegpt" else OPENAI_TAGS), **(tags or {})}
    if ranking:
        base.update(chosen="chosen", rejected="rejected")
    cols = {**base, **explicit}
    return DatasetSpec(name, path, formatting, kind, ranking, cols, tag_map)


def with_kind(spec: DatasetSpec, kind: str) -> DatasetSpec | None:
    """``spec`` read as ``kind`` instead, or None when its format cannot yield that kind.

    The one choice the entry's columns leave open: alpaca with only ``prompt`` mapped is pre-training text
    in LLaMA-Factory, but the same mapping over instruction data (with the default ``output`` column) is a
    conversation. Other kinds follow from ``ranking``/``kto_tag`` and cannot be switched."""
    if kind == spec.kind:
        return spec
    if spec.formatting != "alpaca" or {kind, spec.kind} != {"text", "conversation"}:
        return None
    if kind == "text":
        return dataclasses.replace(spec, kind=kind, columns={"prompt": spec.columns["prompt"]})
    return dataclasses.replace(spec, kind=kind, columns={**ALPACA_COLUMNS, **spec.columns})


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """A parsed ``dataset_info.json``: ``entries`` maps dataset names to their raw entries."""

    path: str
    entries: Mapping[str, Any]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DatasetInfo:
        """Reads ``path``: a ``dataset_info.json`` or the directory (LLaMA-Factory's ``dataset_dir``)
        holding one."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "dataset_info.json")
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such dataset_info.json")
        entries = load_json_file(path)
        if not isinstance(entries, dict):
            raise DataError(f"{path}: expected an object mapping dataset names to entries")
        return cls(path, entries)

    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name: str) -> DatasetSpec:
        """The spec of dataset ``name``; :class:`DataError` when it is unknown, remote or malformed."""
        if name not in self.entries:
            close = difflib.get_close_matches(name, self.names(), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            known = f"datasets: {listed(self.names())}" if self.entries else "it lists none"
            raise DataError(f"{self.path}: no dataset named {name!r}{hint} ({known})")
        raw = self.entries[name]
        where = f"{self.path}: dataset {name!r}"
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected an object, got {type(raw).__name__}")
        if not raw.get("file_name"):
            remote = [f"{k}={raw[k]!r}" for k in _REMOTE if raw.get(k)]
            if remote:
                raise DataError(
                    f"{where} is remote ({', '.join(remote)}): remote datasets are not downloaded; download it "
                    "beside dataset_info.json and set 'file_name'"
                )
            raise DataError(f"{where}: has no 'file_name'")
        formatting = raw.get("formatting", "alpaca")
        if formatting not in FORMATTINGS:
            raise DataError(f"{where}: formatting {formatting!r}; expected one of {', '.join(FORMATTINGS)}")
        ranking = raw.get("ranking", False)
        if not isinstance(ranking, bool):
            raise DataError(f"{where}: 'ranking' must be true or false, got {ranking!r}")
        columns = _string_map(raw.get("columns"), KNOWN_COLUMNS, f"{where}: 'columns'")
        tags = _string_map(raw.get("tags"), KNOWN_TAGS, f"{where}: 'tags'")
        media = [c for c in _MEDIA if columns.get(c)]
        if media:
            raise DataError(f"{where}: multimodal columns ({', '.join(media)}) are not supported")
        path = os.path.join(os.path.dirname(self.path), raw["file_name"])
        return make_spec(name, path, formatting, ranking=ranking, columns=columns, tags=tags)


def _string_map(raw: Any, known: tuple[str, ...], where: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise DataError(f"{where} must map names to strings, got {raw!r}")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        # LLaMA-Factory ignores unknown keys; a typo ("promt") would then silently read the default column.
        raise DataError(f"{where}: unknown {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    return dict(raw)


def convert(value: Any, spec: DatasetSpec) -> dict:
    """One record of ``spec``'s dataset as a canonical record of kind ``spec.kind``.

    Raises :class:`RecordError` whose field path is in the source's own terms (``conversations[3].from``).
    """
    if not isinstance(value, dict):
        raise RecordError("", "a JSON object", value)
    if spec.formatting == "alpaca":
        return alpaca_to_canonical(value, spec)
    return sharegpt_to_canonical(value, spec)


def alpaca_to_canonical(value: dict, spec: DatasetSpec) -> dict:
    """Alpaca: system, then history pairs, then the user turn ``instruction`` + ``"\\n" + input`` (when the
    input is non-empty, as LLaMA-Factory joins them), then ``output`` (or ``chosen``/``rejected``)."""
    cols = spec.columns
    if spec.kind == "text":
        return {"text": str_column(value, cols["prompt"], "the document, a string")}
    prompt: list[dict] = []
    system = optional_str(value, cols.get("system"))
    if system is not None:
        prompt.append({"role": "system", "content": system})
    prompt.extend(_history(value, cols.get("history")))
    instruction = str_column(value, cols["prompt"], "the instruction, a string")
    query = optional_str(value, cols.get("query"))
    prompt.append({"role": "user", "content": "\n".join(p for p in (instruction, query) if p)})
    out: dict[str, Any]
    if spec.kind == "preference":
        chosen, rejected = (_answer(value, cols[k]) for k in ("chosen", "rejected"))
        out = {"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}
    elif spec.kind == "unpaired":
        out = {"prompt": prompt, "completion": [_answer(value, cols["response"])]}
        out["label"] = kto_label(value, cols["kto_tag"])
    else:
        out = {"messages": [*prompt, _answer(value, cols["response"])]}
    tools = parse_tools(value.get(cols["tools"]), cols["tools"]) if cols.get("tools") else None
    if tools:
        out["tools"] = tools
    return out


def _answer(value: dict, key: str) -> dict:
    return {"role": "assistant", "content": str_column(value, key, "the answer, a string")}


def _history(value: dict, key: str | None) -> list[dict]:
    if not key or value.get(key) in (None, ""):
        return []
    pairs = expect_list(value[key], key, "a list of [prompt, response] pairs")
    turns = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise RecordError(f"{key}[{i}]", "a [prompt, response] pair of strings", pair)
        turns.append({"role": "user", "content": expect_str(pair[0], f"{key}[{i}][0]")})
        turns.append({"role": "assistant", "content": expect_str(pair[1], f"{key}[{i}][1]")})
    return turns
