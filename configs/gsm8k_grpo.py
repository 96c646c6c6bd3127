"""GRPO on GSM8K: an instruct model learns grade-school math from a verifier's rewards (the real recipe).

    python -m jaxrl_llm.train --config configs/gsm8k_grpo.py \
        --config.model.path=/models/Qwen2.5-0.5B-Instruct --config.data.path=/data/gsm8k/train.jsonl \
        --config.data.eval_path=/data/gsm8k/test.jsonl

What it needs, all local (nothing is downloaded): an HF checkpoint directory of Qwen2.5-0.5B-Instruct or
Qwen3-0.6B (its tokenizer and chat template are used as they are), and GSM8K's `train.jsonl` / `test.jsonl`
from openai/grade-school-math (or an HF `datasets.save_to_disk` folder of `openai/gsm8k`): the data layer
turns each `{question, answer}` into an RL prompt whose ground truth is the number after `####`. The reward
is `math_verify` (the completion's final answer: `\\boxed{}`, "the answer is", `####`, else its last number).

Each iteration samples 16 problems x 8 answers of up to 512 tokens at temperature 1, and makes one update
(GRPO's group-normalised advantages, no KL term: the reference is not even loaded). Every 50 iterations the
1,319 test problems are answered greedily: `eval/exact_match` (before training too, `eval/exact_match_start`).
Parameters and AdamW stay float32, compute and rollouts run in bfloat16 (`rl.rollout_is=token` corrects the
small bf16-sampler / fp32-trainer mismatch; `rollout/mismatch_kl` shows it), layers rematerialised.

Expected footprint (estimates from parameter counts, not yet measured here; the CPU test only smoke-tests
this recipe on a tiny random model): Qwen2.5-0.5B needs ~8 GB for float32 parameters and AdamW plus a few
GB of activations and KV cache at 128 rows x 768 tokens, so one 24 GB GPU is enough; an iteration is about
63k generated and 98k trained tokens, seconds on an H100 (tens on a v5e-8, whose 8 chips split the rows:
`parallel.data=8`), so 300 iterations take well under an hour. Qwen3-0.6B is alike; with its thinking
template raise `rollout.max_new_tokens`. On one CPU core it runs, but at tokens per second, not thousands.
"""

import ml_collections

from jaxrl_llm.config import base_config


def get_config() -> ml_collections.ConfigDict:
    cfg = base_config()
    cfg.stage = "grpo"
    cfg.run_dir = "runs/gsm8k_grpo"

    cfg.model.path = "models/Qwen2.5-0.5B-Instruct"  # a local HF directory; its tokenizer and template too
    cfg.model.dtype = "bfloat16"
    cfg.model.param_dtype = "float32"
    cfg.model.remat = "full"

    cfg.data.path = "data/gsm8k/train.jsonl"
    cfg.data.eval_path = "data/gsm8k/test.jsonl"
    cfg.data.max_tokens = 256  # rendered prompts; GSM8K's are 80-250 tokens with Qwen's template

    cfg.rollout.max_new_tokens = 512
    cfg.rollout.temperature = 1.0
    cfg.rollout.dtype = "bfloat16"

    cfg.rl.algorithm = "grpo"
    cfg.rl.prompts_per_iteration = 16
    cfg.rl.group_size = 8
    cfg.rl.beta = 0.0
    cfg.rl.rollout_is = "token"
    cfg.reward.functions = [{"name": "math_verify", "weight": 1.0}]

    cfg.optimizer.lr = 1e-6
    cfg.optimizer.warmup_steps = 10
    cfg.optimizer.schedule = "constant"
    cfg.optimizer.weight_decay = 0.0
    cfg.optimizer.clip_norm = 1.0

    cfg.train.steps = 300
    cfg.train.grad_accum_steps = 4  # 128 rows an update, 32 a micro-batch
    cfg.train.log_every = 5
    cfg.train.eval_every = 50
    cfg.train.save_every = 50
    return cfg
