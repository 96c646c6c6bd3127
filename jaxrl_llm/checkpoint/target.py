"""What a command pointed at a trained model serves: an HF checkpoint directory, or a training run's
directory (its ``final/`` export, and from its ``train_config.json`` the chat template it trained with).

``resolve_target(path) -> Target`` finds the model directory and the run's recorded config;
``target_renderer(target, template=None)`` renders with the run's template (else the tokenizer's own), so
that evaluation, serving, the chat CLI and the sanity check all see the prompts training saw.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from jaxrl_llm.errors import UserError


@dataclasses.dataclass(frozen=True)
class Target:
    """A model to load.

    Attributes:
      model_dir: the HF checkpoint directory (a run's ``final/``, or the directory given).
      run_dir: the training run's directory, or None for a plain HF checkpoint.
      run_config: the run's ``train_config.json`` (``{}`` without one).
    """

    model_dir: Path
    run_dir: Path | None
    run_config: dict[str, Any]

    @property
    def template(self) -> str | None:
        """The chat template the run trained with (None: the tokenizer's own)."""
        return (self.run_config.get("render") or {}).get("template") or None

    @property
    def stage(self) -> str | None:
        return self.run_config.get("stage")


def resolve_target(path: str | os.PathLike) -> Target:
    """The model directory, run directory and run config of ``path``; a ``UserError`` naming ``path`` when
    it is neither an HF checkpoint nor a finished run."""
    from jaxrl_llm.models.hf_io import checkpoint_dir

    where = Path(path)
    if not where.is_dir():
        raise UserError(f"{path}: not a directory (expected an HF checkpoint or a run directory)")
    model_dir = checkpoint_dir(where)
    if not (model_dir / "config.json").exists():
        raise UserError(f"{path}: neither an HF checkpoint (no config.json) nor a run directory with final/")
    config = where / "train_config.json"
    run_dir = where if model_dir != where or config.exists() else None
    try:
        run_config = json.loads(config.read_text()) if config.exists() else {}
    except (OSError, ValueError) as err:
        raise UserError(f"{config}: not readable as JSON ({err})") from None
    return Target(model_dir, run_dir, run_config if isinstance(run_config, dict) else {})


def target_renderer(target: Target, template: str | None = None) -> Any:
    """The ``Renderer`` of ``target``: ``template``, else the run's recorded template, else the tokenizer's."""
    from jaxrl_llm.render import Renderer, load_tokenizer

    return Renderer(load_tokenizer(target.model_dir), template or target.template)
