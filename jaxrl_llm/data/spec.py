"""How to read one LLaMA-Factory dataset: the :class:`DatasetSpec` both format converters take.

``llamafactory`` builds specs (from ``dataset_info.json`` entries, with LLaMA-Factory's defaults) and
converts ``alpaca`` records; ``sharegpt`` converts ``sharegpt``/``openai`` records. The spec lives here so
that both can import it and ``llamafactory`` can import ``sharegpt``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to read one dataset: its file, LLaMA-Factory ``formatting``, resolved ``columns`` (role ->
    key) and ``tags``, and the canonical ``kind`` it yields."""

    name: str
    path: str
    formatting: str
    kind: str
    ranking: bool = False
    columns: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
