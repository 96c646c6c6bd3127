"""Run by test_train_rl.py with 8 simulated CPU devices: the fused GRPO run of its ``fused_run`` fixture on a
2 x 2 x 2 (data, fsdp, tensor) mesh, exported to ``argv[1]`` for the test to compare with one device; with
``argv[2] == "split"``, the same run with its rollouts on a mesh of their own (4 devices training, 4 rolling
out) into ``argv[1]/split``, and one step off-policy into ``argv[1]/off_policy``; then a LoRA run with a KL
penalty and a learned reward model (``argv[3]``) with every RL role on a mesh of its own (2 devices each:
training, rollouts, reference, reward model) into ``argv[1]/roles``."""

from __future__ import annotations

import sys

import jax

jax.config.update("jax_default_matmul_precision", "highest")

from tests.test_train_rl import ANSWER_MATCH, HELD_OUT, ROLES, roles_reward, train  # noqa: E402


def main(out: str, mode: str = "sharded", reward_model: str = "") -> int:
    assert jax.device_count() == 8, jax.devices()
    reward = f"--config.reward.functions={ANSWER_MATCH}"
    if mode == "split":
        split = (
            "--config.parallel.data=2",
            "--config.parallel.fsdp=2",
            "--config.rollout.mesh=data=2,tensor=2",
        )
        assert train(f"{out}/split", HELD_OUT, reward, *split) == 0
        stale = ("--config.rollout.off_policy=true", "--config.rl.rollout_is=token")
        assert train(f"{out}/off_policy", reward, *split, *stale) == 0
        apart = (
            "--config.parallel.data=2",
            "--config.rollout.mesh=data=2",
            "--config.rl.reference_mesh=data=2",
            "--config.reward.mesh=data=2",
        )
        assert train(f"{out}/roles", *ROLES, roles_reward(reward_model), *apart) == 0
        print("split-mesh RL runs finished")
        return 0
    mesh = ("--config.parallel.data=2", "--config.parallel.fsdp=2", "--config.parallel.tensor=2")
    assert train(out, HELD_OUT, reward, *mesh) == 0
    print("8-device RL run finished")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
