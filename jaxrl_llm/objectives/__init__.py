"""Training objectives: pure loss functions and the ``Objective`` bundles the step factory trains."""

from .base import Objective
from .kto import kto_objective
from .pairs import (
    dpo_objective,
    orpo_objective,
    pair_logps,
    reference_logps,
    rm_objective,
    simpo_objective,
)
from .preference import DPO_LOSS_TYPES, bradley_terry_loss, dpo_loss, kto_loss, orpo_loss, simpo_loss
from .sft import sft_objective, token_logps

__all__ = [
    "DPO_LOSS_TYPES",
    "Objective",
    "bradley_terry_loss",
    "dpo_loss",
    "dpo_objective",
    "kto_loss",
    "kto_objective",
    "orpo_loss",
    "orpo_objective",
    "pair_logps",
    "reference_logps",
    "rm_objective",
    "sft_objective",
    "simpo_loss",
    "simpo_objective",
    "token_logps",
]
