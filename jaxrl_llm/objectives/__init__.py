"""Training objectives: pure loss functions and the ``Objective`` bundles the step factory trains."""

from .base import Objective
from .sft import sft_objective, token_logps

__all__ = ["Objective", "sft_objective", "token_logps"]
