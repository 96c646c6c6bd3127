"""Stage registry: ``config.stage`` -> the function that runs it.

A stage function takes the validated config and returns an exit code (None means 0). It imports its heavy
modules (JAX, models, data) inside its body, so that ``python -m jaxrl_llm.train`` has validated and
printed the config before any of them load.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import ml_collections

from .pairs import run_pairs
from .sft import run_sft

StageFn = Callable[[ml_collections.ConfigDict], int | None]

EXIT_NOT_IMPLEMENTED = 3

# None = not implemented yet. The keys match jaxrl_llm.config.STAGE_NAMES (a test checks it).
STAGES: dict[str, StageFn | None] = {
    "sft": run_sft,
    "pt": run_sft,  # continued pre-training: the SFT loss on raw text
    "rm": run_pairs,  # reward model (Bradley-Terry on a score head)
    "dpo": run_pairs,
    "kto": run_pairs,  # KTO: unpaired desirable / undesirable completions
    "orpo": run_pairs,
    "simpo": run_pairs,
    "ppo": None,  # TODO(RL issue)
    "grpo": None,  # TODO(RL issue)
}

_ARRIVES_WITH = {name: "the RL issue" for name in ("ppo", "grpo")}


def implemented_stages() -> tuple[str, ...]:
    return tuple(name for name, fn in STAGES.items() if fn is not None)


def not_implemented_message(stage: str) -> str:
    arrives = _ARRIVES_WITH.get(stage)
    when = f" (it arrives with {arrives})" if arrives else ""
    done = ", ".join(implemented_stages()) or "none"
    return f"jaxrl_llm.train: stage {stage!r} is not implemented yet{when}. Implemented stages: {done}."


def run_stage(cfg: ml_collections.ConfigDict) -> int:
    """Runs ``cfg.stage``; returns the process exit code (3 when the stage does not exist yet)."""
    fn = STAGES.get(cfg.stage)
    if fn is None:
        print(not_implemented_message(cfg.stage), file=sys.stderr)
        return EXIT_NOT_IMPLEMENTED
    code = fn(cfg)
    return 0 if code is None else int(code)
