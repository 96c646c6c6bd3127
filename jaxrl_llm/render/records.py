"""Rendering canonical records: what each kind renders to, its token lengths, and the parity check on a sample.

What a record of each kind (``jaxrl_llm.data.records``) renders to:

===========  ==========================================================================
kind         rendered sequences
===========  ==========================================================================
conversation ``messages`` (with the record's ``tools``)
preference   ``prompt + chosen`` and ``prompt + rejected``
unpaired     ``prompt + completion``
prompt       ``prompt`` plus the generation prompt (what rollout feeds the model)
text         ``text`` encoded as it is (no template)
===========  ==========================================================================

The parity check (``Renderer.check``) runs on every sequence with assistant turns; an RL prompt has none
to check, so it is only rendered.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .render import Renderer
from .templates import RenderError


def sequences(record: dict) -> Iterator[tuple[str, list[dict], bool]]:
    """``(name, messages, is_prompt)`` for each sequence a canonical record renders to (none for text)."""
    if "messages" in record:
        yield "messages", record["messages"], False
    elif "chosen" in record:
        yield "prompt + chosen", record["prompt"] + record["chosen"], False
        yield "prompt + rejected", record["prompt"] + record["rejected"], False
    elif "completion" in record:
        yield "prompt + completion", record["prompt"] + record["completion"], False
    elif "prompt" in record:
        yield "prompt", record["prompt"], True


def token_lengths(record: dict, renderer: Renderer) -> list[int]:
    """Token count of each sequence ``record`` renders to (one render each, no mask); for a text record,
    the length ``SFTEncoder`` gives it (EOS included).

    Raises:
      RenderError: the template cannot render the record, naming the sequence.
    """
    if "text" in record:  # what SFTEncoder trains on: the text's ids plus EOS
        return [len(renderer.encode(record["text"])) + (renderer.tokenizer.eos_id is not None)]
    tools = record.get("tools")
    lengths = []
    for name, messages, is_prompt in sequences(record):
        try:
            ids = (
                renderer.render_prompt(messages, tools) if is_prompt else renderer.render_ids(messages, tools)
            )
        except RenderError as err:
            raise RenderError(f"{name}: {err}") from err
        lengths.append(len(ids))
    return lengths


def check_record(record: dict, renderer: Renderer) -> None:
    """``Renderer.check`` on every sequence of ``record``; a RenderError names the sequence."""
    tools = record.get("tools")
    for name, messages, is_prompt in sequences(record):
        try:
            if is_prompt:
                renderer.render_prompt(messages, tools)
            else:
                renderer.check(messages, tools)
        except RenderError as err:
            raise RenderError(f"{name}: {err}") from err


@dataclasses.dataclass(frozen=True)
class ParityReport:
    """The parity check over a sample: records ``checked``, how many ``failed``, and the first ``errors``
    (each naming the record's location, the sequence, the turn and the first differing token)."""

    checked: int
    failed: int
    errors: list[str]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _sample(count: int, n: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(count), min(max(n, 0), count)))


def _where(i: int, locations: Sequence[Any] | None) -> str:
    return str(locations[i]) if locations is not None else f"record {i}"


def _failures(
    records: Sequence[dict], renderer: Renderer, picked: Sequence[int]
) -> Iterator[tuple[int, str]]:
    """``(index, message)`` for each record of ``picked`` that fails ``check_record``, in order."""
    for i in picked:
        try:
            check_record(records[i], renderer)
        except RenderError as err:
            yield i, str(err)


def parity_report(
    records: Sequence[dict],
    renderer: Renderer,
    n: int,
    seed: int = 0,
    *,
    locations: Sequence[Any] | None = None,
    max_errors: int = 5,
) -> ParityReport:
    """Checks a random sample of ``n`` records (all when ``n >= len(records)``) and counts the failures.

    ``locations[i]`` names record ``i`` in errors (``LoadedDataset.locations``: file and line); without
    it, records are named by their index.
    """
    picked = _sample(len(records), n, seed)
    failures = [f"{_where(i, locations)}: {err}" for i, err in _failures(records, renderer, picked)]
    return ParityReport(len(picked), len(failures), failures[:max_errors])


def check_parity_sample(
    records: Sequence[dict],
    renderer: Renderer,
    n: int,
    seed: int = 0,
    *,
    locations: Sequence[Any] | None = None,
) -> int:
    """The data-load-time parity check: the sample of ``parity_report``, stopping at the first failure.

    Returns the number of records checked.

    Raises:
      RenderError: at the first failing record, prefixed with its location.
    """
    picked = _sample(len(records), n, seed)
    for i, err in _failures(records, renderer, picked):
        raise RenderError(
            f"{_where(i, locations)}: parity check failed with template {renderer.template_name}: {err}"
        )
    return len(picked)


@dataclasses.dataclass(frozen=True)
class SFTEncoder:
    """``record -> {"ids", "loss_mask"}`` for the SFT data pipeline (picklable, so it runs in Grain workers).

    Conversations render through the renderer (assistant turns are targets); text records (continued
    pre-training) are encoded as they are plus EOS, every token a target.
    """

    renderer: Renderer

    def __call__(self, record: dict) -> dict[str, Any]:
        if "text" in record:
            ids = self.renderer.encode(record["text"])
            eos = self.renderer.tokenizer.eos_id
            if eos is not None:
                ids = np.append(ids, np.int32(eos))
            return {"ids": ids, "loss_mask": np.ones(len(ids), bool)}
        if "messages" not in record:
            raise RenderError(f"SFT trains on conversation or text records, not on {sorted(record)}")
        rendered = self.renderer.render(record["messages"], record.get("tools"))
        return {"ids": rendered.ids, "loss_mask": rendered.loss_mask}


def _check_prefix(ids: np.ndarray, prompt: np.ndarray) -> None:
    if not np.array_equal(ids[: len(prompt)], prompt):
        raise RenderError(
            "the chat template renders the prompt differently alone and followed by an answer, so the answers "
            "cannot share one rendering of the prompt (preference pairs and KTO read the prompt once)"
        )


@dataclasses.dataclass(frozen=True)
class PairEncoder:
    """``preference record -> {"chosen": example, "rejected": example, "prompt_len"}`` (picklable, for Grain
    workers).

    Each side is ``prompt + answer`` rendered as training renders conversations; only the answer's tokens
    are targets (a multi-turn prompt's earlier assistant turns are context, not trained on). Both start
    with the rendered prompt (its first ``prompt_len`` tokens), which the pair's row holds once.
    """

    renderer: Renderer

    def __call__(self, record: dict) -> dict[str, Any]:
        if "chosen" not in record:
            raise RenderError(
                f"preference training needs prompt/chosen/rejected records, not {sorted(record)}"
            )
        tools = record.get("tools")
        prompt = self.renderer.render_prompt(record["prompt"], tools)
        start = len(prompt)
        out: dict[str, Any] = {"prompt_len": start}
        for side in ("chosen", "rejected"):
            rendered = self.renderer.render(record["prompt"] + record[side], tools)
            _check_prefix(rendered.ids, prompt)
            mask = rendered.loss_mask & (np.arange(len(rendered.ids)) >= start)
            out[side] = {"ids": rendered.ids, "loss_mask": mask}
        return out


@dataclasses.dataclass(frozen=True)
class KTOEncoder:
    """``unpaired record -> {"ids", "loss_mask", "prompt_len", "desirable"}`` (picklable, for Grain workers).

    The sequence is ``prompt + completion`` rendered as training renders conversations, only the
    completion's tokens targets; ``prompt_len`` is where the completion starts (the rendered prompt with
    its generation prompt, exactly what inference renders), so the pipeline can pair the prompt with
    another record's completion (``data.packing.kto_rows``); ``desirable`` is the record's label.
    """

    renderer: Renderer

    def __call__(self, record: dict) -> dict[str, Any]:
        if "completion" not in record or "label" not in record:
            raise RenderError(f"KTO trains on prompt/completion/label records, not {sorted(record)}")
        tools = record.get("tools")
        prompt = self.renderer.render_prompt(record["prompt"], tools)
        rendered = self.renderer.render(record["prompt"] + record["completion"], tools)
        start = len(prompt)
        _check_prefix(rendered.ids, prompt)
        mask = rendered.loss_mask & (np.arange(len(rendered.ids)) >= start)
        return {
            "ids": rendered.ids,
            "loss_mask": mask,
            "prompt_len": start,
            "desirable": bool(record["label"]),
        }
