"""GRPO on GSM8K with Qwen3-0.6B on a TPU v5e-8 (one host, 8 chips of 16 GB), bf16 compute, FSDP over 8 chips.

    tpu/run.sh configs/tpu/qwen3_0.6b_grpo_v5e8.py --config.model.path=/mnt/models/Qwen3-0.6B \
        --config.data.path=/mnt/data/gsm8k/train.jsonl --config.data.eval_path=/mnt/data/gsm8k/test.jsonl

(or `python -m jaxrl_llm.train --config ...` with the same overrides on the TPU VM itself). The recipe is
configs/gsm8k_grpo.py's, laid out for the v5e-8; see tpu/README.md for creating the VM and installing.

Paths you supply. ``model.path`` (an HF checkpoint directory of Qwen/Qwen3-0.6B: config.json, safetensors,
tokenizer files; its chat template is used as it is) and the GSM8K files (openai/grade-school-math's
`train.jsonl` / `test.jsonl`) are paths on the TPU host; nothing is downloaded. The paths written here and in configs/gsm8k_grpo.py are
placeholders relative to the checkout. Config validation reads ``<model.path>/config.json`` and checks that
the tokenizer files exist, so on a machine without the weights only the ``model.path`` check fails; the test
(tests/test_launch.py) validates everything else against a stand-in directory holding Qwen3-0.6B's
config.json.

Layout: ``parallel.fsdp=8`` (data=1, tensor=1). Parameters and AdamW stay float32 (~0.6B x 16 bytes with
gradients = ~9.6 GB): replicated on every chip (data parallelism) they would leave too little of its 16 GB
for the rollout's KV cache and the update's logits; sharded over 8 chips they take ~1.2 GB each. The batch rows are split over all 8 chips too (the ``batch`` axis maps to data x
fsdp), so every row count below is a multiple of 8. float32 parameters matter at lr 1e-6: a bfloat16
parameter would round most such updates away.

Each iteration samples 16 problems x 8 answers (128 rows) of up to 1,024 tokens (Qwen3's template thinks
first, in ``<think>``; answers cut at the limit get no reward for a missing final answer) in bfloat16 with
rollout correction, and makes one update in 8 micro-batches of 16 rows (2 per chip). Memory estimates per
chip, not measured (no TPU was reachable from this project's CI): KV cache 128 rows x 1,280 positions x 28
layers ~2.4 GB, logits of a micro-batch (16 x 1,280 x 151,936 float32) ~1.6 GB plus their gradient,
parameters and optimizer ~1.2 GB. Raise ``train.grad_accum_steps`` if the compile-time memory report (printed
before step 0) exceeds the chip.

Another slice: keep ``parallel.data * parallel.fsdp * parallel.tensor`` equal to its chip count (e.g.
``--config.parallel.fsdp=4`` on a v5e-4, or ``--config.parallel.fsdp=-1`` to fill whatever is there).
"""

from pathlib import Path

import ml_collections

from jaxrl_llm.config.cli import load_config

RECIPE = Path(__file__).resolve().parents[1] / "gsm8k_grpo.py"  # the GSM8K GRPO recipe this lays out


def get_config() -> ml_collections.ConfigDict:
    cfg = load_config(str(RECIPE))
    cfg.run_dir = "runs/qwen3_0.6b_grpo_v5e8"
    cfg.model.path = "models/Qwen3-0.6B"  # placeholder: --config.model.path=<HF directory on the TPU host>

    cfg.parallel.data = 1
    cfg.parallel.fsdp = 8
    cfg.parallel.tensor = 1

    cfg.rollout.max_new_tokens = 1024  # Qwen3 thinks first, in <think>
    cfg.train.grad_accum_steps = 8  # 128 rows an update, 16 a micro-batch (2 per chip)
    return cfg
