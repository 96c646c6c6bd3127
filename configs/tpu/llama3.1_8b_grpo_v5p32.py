"""GRPO on GSM8K with Llama-3.1-8B-Instruct on a TPU v5p-32: 4 hosts x 4 chips = 16 chips of 95 GB, bf16 compute.

    TPU_NAME=jaxrl-v5p-32 ZONE=us-east5-a tpu/run.sh configs/tpu/llama3.1_8b_grpo_v5p32.py \
        --config.model.path=/mnt/models/Llama-3.1-8B-Instruct \
        --config.data.path=/mnt/data/gsm8k/train.jsonl --config.data.eval_path=/mnt/data/gsm8k/test.jsonl

tpu/run.sh starts the same command on the 4 hosts at once; together they form one 16-chip mesh (v5p names
count TensorCores, two per chip: a v5p-32 has 16 chips). See tpu/README.md for creating the slice.

Paths you supply. ``model.path`` (an HF checkpoint directory of meta-llama/Llama-3.1-8B-Instruct: config.json,
safetensors, tokenizer.json and tokenizer_config.json with its chat template) and the GSM8K files are paths
that every host can read (a copy on each, or a shared disk); nothing is downloaded. The paths written here and
in configs/gsm8k_grpo.py are placeholders relative to the checkout. Config validation reads ``<model.path>/config.json`` and checks
that the tokenizer files exist, so on a machine without the weights only the ``model.path`` check fails; the
test (tests/test_launch.py) validates everything else against a stand-in directory holding Llama-3.1-8B's
config.json.

Layout: ``parallel.fsdp=4, parallel.tensor=4`` (data=1). Parameters and AdamW stay float32: 8.0B x 16 bytes
with gradients = ~128 GB, ~8 GB per chip once sharded over all 16. Tensor parallelism (the mesh's innermost
axis) splits the 32 query heads, 8 KV heads, the MLP and the 128,256-entry vocabulary 4 ways, so each decode
step of the rollout gathers a quarter of the weights over ``fsdp`` instead of all of them (``fsdp=16``
would also fit, with 4x the weight traffic per generated token). Batch rows split over data x fsdp = 4 ways:
every row count below is a multiple of 4.

Each iteration samples 64 problems x 8 answers (512 rows) of up to 1,024 tokens in bfloat16 with rollout
correction, and makes one update in 8 micro-batches of 64 rows. Memory estimates per chip, not measured (no
TPU was reachable from this project's CI): parameters, gradients and optimizer ~8 GB; KV cache 512 rows x
1,280 positions x 32 layers ~5.4 GB; logits of a micro-batch (64 x 1,280 x 128,256 float32, vocabulary over
``tensor``) ~2.6 GB plus their gradient; rematerialised block inputs ~5.4 GB. The compile-time memory report
(printed before step 0) says what XLA actually plans.

Another slice: keep ``parallel.data * parallel.fsdp * parallel.tensor`` equal to its chip count (e.g. a
v5p-64, 32 chips: ``--config.parallel.data=2``); keep ``parallel.tensor`` at most 8 (the KV heads).
"""

from pathlib import Path

import ml_collections

from jaxrl_llm.config.cli import load_config

RECIPE = Path(__file__).resolve().parents[1] / "gsm8k_grpo.py"  # the GSM8K GRPO recipe this lays out


def get_config() -> ml_collections.ConfigDict:
    cfg = load_config(str(RECIPE))
    cfg.run_dir = "runs/llama3.1_8b_grpo_v5p32"
    cfg.model.path = (
        "models/Llama-3.1-8B-Instruct"  # placeholder: --config.model.path=<HF directory on every host>
    )

    cfg.parallel.data = 1
    cfg.parallel.fsdp = 4
    cfg.parallel.tensor = 4

    cfg.rollout.max_new_tokens = 1024
    cfg.rl.prompts_per_iteration = 64
    cfg.train.steps = 200
    cfg.train.grad_accum_steps = 8  # 512 rows an update, 64 a micro-batch (16 per data x fsdp shard)
    cfg.train.eval_every = 25
    cfg.train.save_every = 25
    return cfg
