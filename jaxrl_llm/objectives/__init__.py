"""Training objectives: pure loss functions and the ``Objective`` bundles the step factory trains."""

from .base import Objective
from .preference import DPO_LOSS_TYPES, bradley_terry_loss, dpo_loss, kto_loss, orpo_loss, simpo_loss
from .sft import sft_objective, token_logps

__all__ = [
    "DPO_LOSS_TYPES",
    "Objective",
    "bradley_terry_loss",
    "dpo_loss",
    "kto_loss",
    "orpo_loss",
    "sft_objective",
    "simpo_loss",
    "token_logps",
]
