"""Training objectives: pure loss functions and the ``Objective`` bundles the step factory trains."""

from .advantages import (
    BASELINES,
    SCALES,
    adaptive_kl_coef,
    gae,
    group_advantages,
    kl_shaped_rewards,
    whiten,
)
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
from .policy import (
    IMPORTANCE_LEVELS,
    KL_ESTIMATORS,
    LOSS_AGGS,
    POLICY_LOSSES,
    aggregate,
    entropy_from_logits,
    kl_penalty,
    policy_loss,
    policy_token_losses,
    value_loss,
)
from .preference import DPO_LOSS_TYPES, bradley_terry_loss, dpo_loss, kto_loss, orpo_loss, simpo_loss
from .rl import (
    PPO_DEFAULTS,
    RL_ALGORITHMS,
    ROLLOUT_IS,
    PolicyLossConfig,
    completion_logps,
    completion_values,
    policy_objective,
    ppo_objective,
)
from .sft import sft_objective, token_logps

__all__ = [
    "BASELINES",
    "DPO_LOSS_TYPES",
    "IMPORTANCE_LEVELS",
    "KL_ESTIMATORS",
    "LOSS_AGGS",
    "Objective",
    "POLICY_LOSSES",
    "PPO_DEFAULTS",
    "PolicyLossConfig",
    "RL_ALGORITHMS",
    "ROLLOUT_IS",
    "SCALES",
    "adaptive_kl_coef",
    "aggregate",
    "bradley_terry_loss",
    "completion_logps",
    "completion_values",
    "dpo_loss",
    "dpo_objective",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "kl_penalty",
    "kl_shaped_rewards",
    "kto_loss",
    "kto_objective",
    "orpo_loss",
    "orpo_objective",
    "pair_logps",
    "policy_loss",
    "policy_objective",
    "ppo_objective",
    "policy_token_losses",
    "reference_logps",
    "rm_objective",
    "sft_objective",
    "simpo_loss",
    "simpo_objective",
    "token_logps",
    "value_loss",
    "whiten",
]
