"""PPO's trainable pair: the policy and a critic on a separate copy of a backbone, trained together.

``ActorCritic(policy, critic)`` holds a ``CausalLM`` and a ``ScoreModel`` (a value per token). The critic
is made by ``critic_like(policy)`` (the policy's backbone copied, a fresh zero-initialised value head, so
every value starts at 0) or loaded from a reward model's checkpoint (``load_hf(path, head="score")``: the
usual PPO start, a value function that already reads the task). Keeping them separate modules means the
policy's gradients never flow through the critic's weights and the policy exports alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .create import create_model
from .lora import ADAPTER_STATE


class ActorCritic(nnx.Module):
    """The policy (``CausalLM``) and its critic (``ScoreModel``)."""

    def __init__(self, policy: nnx.Module, critic: nnx.Module):
        if getattr(critic, "score", None) is None:
            raise ValueError("the critic must be a score model (head='score')")
        if critic.cfg.vocab_size != policy.cfg.vocab_size:
            raise ValueError(
                f"the critic reads the policy's tokens: its vocabulary ({critic.cfg.vocab_size}) must equal the "
                f"policy's ({policy.cfg.vocab_size})"
            )
        self.policy = policy
        self.critic = critic


def critic_like(policy: nnx.Module, *, mesh=None) -> nnx.Module:
    """A ``ScoreModel`` with a copy of ``policy``'s embeddings, blocks and final norm (each parameter's sharding
    kept; without a LoRA policy's adapters) and a zero value head."""
    critic = create_model(policy.cfg, mesh=mesh, head="score")
    state = nnx.state(critic)
    source = nnx.state(policy, nnx.Not(ADAPTER_STATE))  # the base weights: a LoRA policy's adapters stay
    for part in ("embed", "blocks", "final_norm"):
        state[part] = jax.tree.map(jnp.copy, source[part])
    state["score"] = jax.tree.map(jnp.zeros_like, state["score"])
    nnx.update(critic, state)
    return critic
