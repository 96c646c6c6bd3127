"""Quickstart: supervised fine-tuning of the tiny Llama preset, small enough to run on a laptop CPU.

Run it with ``python -m jaxrl_llm.train --config configs/quickstart.py``; per-key docs are in
jaxrl_llm/config/schema.py (or ``python -m jaxrl_llm.config``).
"""

import ml_collections

from jaxrl_llm.config import base_config


def get_config() -> ml_collections.ConfigDict:
    cfg = base_config()
    cfg.stage = "sft"
    cfg.run_dir = "runs/quickstart"
    cfg.model.preset = "llama-tiny"

    cfg.optimizer.lr = 1e-3  # a tiny model tolerates, and needs, a larger step to move in 50 steps
    cfg.optimizer.warmup_steps = 5

    cfg.train.steps = 50
    cfg.train.batch_size = 4
    cfg.train.seq_len = 64
    cfg.train.log_every = 5
    cfg.train.eval_every = 25
    cfg.train.save_every = 25
    return cfg
