"""RL quickstart: GRPO teaches the SFT quickstart's model the sums it gets wrong, from a verifier's reward.

    make quickstart-rl      (builds runs/quickstart first if it is missing, then runs this config)
    python -m jaxrl_llm.train --config configs/quickstart_grpo.py

The SFT quickstart (``configs/quickstart.py``) learns two-digit addition to ~96% on held-out problems, so
RL on the same problems would have nothing left to fix. Its training problems draw both operands from 0-99,
so single-digit sums ("What is 3 + 4?") are rare in it (1%), and it answers only about half of them right.
They are this run's task: the 100 single-digit sums, 55 to train on and 45 held out. Each iteration samples
16 of them x 8 answers at temperature 1, rewards an answer 1 when its tokens are exactly the sum
(``answer_match``, a device reward: the whole iteration is one compiled program), and makes one GRPO update.
Before training and every 20 iterations the 45 held-out sums are answered greedily; the run ends with

    held-out greedy exact match: 86.7% of 45 prompts (before training: 48.9%)

in under a minute on 2 CPU cores (40 iterations; with ``--config.seed=1`` / ``2``, which also redraw the
held-out set: 51% -> 93% / 82%). ``runs/quickstart_grpo/samples.jsonl`` shows sampled answers with their
rewards and advantages; ``tensorboard --logdir runs/`` the reward, advantage, entropy and KL curves. A tiny
model trained on nothing else forgets: its greedy accuracy on 196 two-digit sums falls from 94% to 36% while
it learns these, as catastrophic forgetting predicts (a KL penalty of 0.04 does not prevent it); train on a
mix of both tasks' prompts to keep both. Longer runs do not help here: at 60 iterations the held-out match
is 78-89%, the policy now noisier than it is better.
"""

import ml_collections

from jaxrl_llm.config import base_config


def get_config() -> ml_collections.ConfigDict:
    cfg = base_config()
    cfg.stage = "grpo"
    cfg.run_dir = "runs/quickstart_grpo"
    cfg.model.path = "runs/quickstart"  # the SFT quickstart's final export (and its tokenizer)
    cfg.render.template = "chatml"  # the template it was trained with

    cfg.data.path = "synthetic:arithmetic_rl?n=100&digits=1&seed=1"  # all 100 single-digit sums
    cfg.data.eval_split = 0.45  # 45 held out, never trained on

    cfg.rollout.max_new_tokens = 6
    cfg.rollout.temperature = 1.0
    cfg.rl.algorithm = "grpo"
    cfg.rl.prompts_per_iteration = 16
    cfg.rl.group_size = 8
    cfg.reward.functions = [{"name": "answer_match", "params": {"ignore_ids": ["<|im_end|>"]}}]

    # RL steps must be small for a 0.85M-parameter model: at 3e-4 its samples improve, then degrade.
    cfg.optimizer.lr = 1e-4
    cfg.optimizer.warmup_steps = 0
    cfg.optimizer.schedule = "constant"
    cfg.optimizer.weight_decay = 0.0

    cfg.train.steps = 40
    cfg.train.log_every = 10
    cfg.train.eval_every = 20
    cfg.train.save_every = 40
    return cfg
