"""A learned reward model as a reward component: loaded once, scoring (prompt, completion) pairs on device.

The model is an HF ``*ForSequenceClassification`` checkpoint with one label (what ``stage=rm`` exports to
its run's ``final/``; a run directory works as the path), with its own tokenizer and chat template: each
pair is rendered as the conversation ``prompt + [assistant: completion]`` through the reward model's
template, so a reward model with another tokenizer than the policy's scores the same text. The score is the
head's output at the last token (``sequence_scores``); batches are right-padded to a power-of-two length,
so the jitted forward compiles once per length bucket. With a ``mesh`` (``reward.mesh``: a mesh of its own
in an RL run) the weights are sharded there by the model's rules and each batch's rows split over its
``data``/``fsdp`` axes (the batch rounded up to a multiple of them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models.transformer import sequence_scores
from ..parallel import padded_rows, put, rows_shardings, to_host
from ..rollout.sampler import prompt_bucket
from .base import RewardError, register


@register("reward_model", "model")
def reward_model(
    *, path: str = "", template: str = "", batch_size: int = 8, max_length: int = 2048, dtype: str = "float32"
) -> None:
    """A learned reward model's score of the whole exchange (see ``RewardModel``)."""


class RewardModel:
    """``score(conversations) -> float32[N]`` with a ``ScoreModel`` and the ``Renderer`` it was trained with."""

    def __init__(
        self, model: Any, renderer: Any, *, batch_size: int = 8, max_length: int = 2048, mesh: Any = None
    ):
        if getattr(model, "score", None) is None:
            raise RewardError("reward model: expected a score model (head='score'), got a model without one")
        self.renderer, self.max_length, self.mesh = renderer, max_length, mesh
        self.batch_size = padded_rows(batch_size, mesh)  # rows split evenly over the mesh
        self.pad_id = renderer.tokenizer.pad_id if renderer.tokenizer.pad_id is not None else 0
        graphdef, self.state = nnx.split(model)

        @jax.jit
        def forward(state, ids, mask):
            scores = nnx.merge(graphdef, state)(ids, attention_mask=mask)
            return sequence_scores(scores, mask)

        self._forward = forward

    @classmethod
    def load(
        cls,
        path: str = "",
        *,
        template: str = "",
        batch_size: int = 8,
        max_length: int = 2048,
        dtype: str = "float32",
        mesh: Any = None,
    ) -> RewardModel:
        """From an HF directory (or a run directory: its ``final/``) holding the model and its tokenizer;
        sharded on ``mesh`` when given."""
        from ..models.hf_io import checkpoint_dir, load_hf
        from ..render import Renderer, load_tokenizer

        if not path:
            raise RewardError("reward_model: set params.path to the reward model (an rm run's directory)")
        where = checkpoint_dir(path)
        model = load_hf(where, dtype=getattr(jnp, dtype), head="score", mesh=mesh)
        tokenizer = load_tokenizer(where)
        renderer = Renderer(tokenizer, template or None)
        return cls(model, renderer, batch_size=batch_size, max_length=max_length, mesh=mesh)

    def score(self, conversations: Sequence[Sequence[Mapping[str, Any]]], tools: Sequence[Any] | None = None):
        """float32[N]: the score of each conversation (usually ending with the assistant's answer).

        A conversation longer than ``max_length`` tokens keeps its last ``max_length`` (the answer's end,
        where the score is read).
        """
        rows = []
        for i, conversation in enumerate(conversations):
            ids = self.renderer.render_ids(conversation, tools[i] if tools else None)
            rows.append(ids[-self.max_length :])
        out = np.zeros(len(rows), np.float32)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            width = prompt_bucket(max(map(len, chunk)))  # the sampler's buckets: powers of two
            ids = np.full((self.batch_size, width), self.pad_id, np.int32)
            mask = np.zeros((self.batch_size, width), np.int32)
            for r, row in enumerate(chunk):
                ids[r, : len(row)], mask[r, : len(row)] = row, 1
            mask[len(chunk) :, 0] = 1  # filler rows: one token, scores discarded
            scores = to_host(self._forward(self.state, *self._placed(ids, mask)))
            out[start : start + len(chunk)] = scores[: len(chunk)]
        return out

    def _placed(self, *rows: np.ndarray) -> tuple[jax.Array, ...]:
        if self.mesh is None:
            return tuple(jnp.asarray(r) for r in rows)
        return tuple(put(rows, rows_shardings(rows, self.mesh)))

    def score_records(self, records: Sequence[Mapping[str, Any]], completions: Sequence[str]) -> np.ndarray:
        """Scores each completion as the assistant's answer to its record's prompt."""
        conversations, tools = [], []
        for record, completion in zip(records, completions, strict=True):
            prompt = record.get("prompt", record.get("messages"))
            if prompt is None:
                raise RewardError(
                    f"reward model: the record has no 'prompt' or 'messages' (keys: {sorted(record)})"
                )
            conversations.append([*prompt, {"role": "assistant", "content": completion}])
            tools.append(record.get("tools"))
        return self.score(conversations, tools if any(t for t in tools) else None)
