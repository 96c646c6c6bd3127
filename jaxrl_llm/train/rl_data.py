"""RL prompts: every record rendered once into a table, drawn in shuffled batches whose position resumes.

``PromptTable(records, renderer)`` renders each RL prompt record's ``prompt`` messages (and ``tools``) exactly
as rollout and serving do (``Renderer.render_prompt``: the template's generation prompt included), left-pads
them to one width (the next power of two above the longest, so one program serves every batch) and encodes
each record's ``ground_truth`` with the policy's tokenizer (``answer_ids``, what device rewards compare
with). ``prompt_batches`` yields the indices of ``rl.prompts_per_iteration`` records per iteration: a Grain
dataset, reshuffled every epoch (seed + epoch), whose iterator state goes into every checkpoint, so a
resumed run draws exactly the prompts the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from flax import struct

from jaxrl_llm.errors import UserError
from jaxrl_llm.rollout import conversation, left_pad, prompt_bucket

ANSWER_LEN = 32  # ground-truth tokens a device reward sees (longer answers are cut)


@struct.dataclass
class Prompts:
    """A batch of rendered prompts (``[P, ...]``; on the host as numpy, on the mesh as sharded arrays).

    Attributes:
      ids: int32[P, W] left-padded prompt ids; mask: int32[P, W] 1 on real tokens.
      answer_ids: int32[P, A] each record's ground truth; answer_mask: bool[P, A] (all False without one).
      index: int32[P] the records' positions in the table (for their host-side fields).
    """

    ids: Any
    mask: Any
    answer_ids: Any
    answer_mask: Any
    index: Any


class PromptTable:
    """The rendered RL prompts of a record list (module docstring)."""

    def __init__(
        self,
        records: Sequence[dict],
        renderer: Any,
        *,
        pad_id: int,
        width: int | None = None,
        what: str = "data",
    ):
        if not records:
            raise UserError(f"{what}: no RL prompt records")
        self.records = list(records)
        rendered = [renderer.render_prompt(*conversation(r, i)).tolist() for i, r in enumerate(self.records)]
        self.longest = max(map(len, rendered))
        self.width = width or prompt_bucket(self.longest)
        if self.longest > self.width:
            raise UserError(f"{what}: a prompt has {self.longest} tokens, more than the width {self.width}")
        self.ids, self.mask = left_pad(rendered, pad_id, self.width)
        tok = renderer.tokenizer
        self.answer_ids = np.zeros((len(self.records), ANSWER_LEN), np.int32)
        self.answer_mask = np.zeros((len(self.records), ANSWER_LEN), bool)
        for i, record in enumerate(self.records):
            value = record.get("ground_truth")
            if value is not None:
                ids = tok.encode(str(value), add_special_tokens=False)[:ANSWER_LEN]
                self.answer_ids[i, : len(ids)], self.answer_mask[i, : len(ids)] = ids, True

    def __len__(self) -> int:
        return len(self.records)

    def batch(self, index: np.ndarray) -> Prompts:
        index = np.asarray(index, np.int32)
        return Prompts(
            ids=self.ids[index],
            mask=self.mask[index],
            answer_ids=self.answer_ids[index],
            answer_mask=self.answer_mask[index],
            index=index,
        )


def prompt_batches(count: int, batch: int, seed: int) -> grain.IterDataset:
    """Endless batches of ``batch`` record indices out of ``count``: each epoch a new permutation (no record
    twice in a batch; the last partial batch of an epoch is dropped)."""
    if batch > count:
        raise UserError(
            f"rl.prompts_per_iteration={batch} exceeds the {count} training prompts: lower it or add data"
        )
    ds = grain.MapDataset.range(count).shuffle(seed=seed).batch(batch, drop_remainder=True).repeat(None)
    return ds.to_iter_dataset()


def on_mesh(prompts: Prompts, mesh: Any) -> Prompts:
    """Host prompts as global arrays on ``mesh``, rows over the data axes."""
    from jaxrl_llm.parallel import put, rows_shardings

    return put(prompts, rows_shardings(prompts, mesh))
