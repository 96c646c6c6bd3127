"""Run by test_train_rl.py with 8 simulated CPU devices: the fused GRPO run of its ``fused_run`` fixture on a
2 x 2 x 2 (data, fsdp, tensor) mesh, exported to ``argv[1]`` for the test to compare with one device."""

from __future__ import annotations

import sys

import jax

jax.config.update("jax_default_matmul_precision", "highest")

from tests.test_train_rl import ANSWER_MATCH, HELD_OUT, train  # noqa: E402


def main(out: str) -> int:
    assert jax.device_count() == 8, jax.devices()
    mesh = ("--config.parallel.data=2", "--config.parallel.fsdp=2", "--config.parallel.tensor=2")
    assert train(out, HELD_OUT, f"--config.reward.functions={ANSWER_MATCH}", *mesh) == 0
    print("8-device RL run finished")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
