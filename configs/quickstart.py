"""Quickstart: a tiny Llama learns two-digit addition from scratch, in chat form, on a laptop CPU.

    python -m jaxrl_llm.train --config configs/quickstart.py        (what `make quickstart` runs)

Everything is made in-process: 8,000 problems ("What is 47 + 38?" -> "85", all distinct) from the synthetic
source, a 128-token byte-level BPE tokenizer with a ChatML template trained on them (digits one per token),
and a 0.8M-parameter Llama (4 layers, width 128). 200 problems are held out; the run evaluates them before
training and every 200 steps, generating each answer greedily and counting exact matches. About 2.5 minutes
on 2 CPU cores (600 steps), from 0% to above 90% held-out exact match. The result (``runs/quickstart/final``) is
an HF checkpoint with its tokenizer, the base model of the RL quickstart (``configs/quickstart_grpo.py``).

Per-key docs: jaxrl_llm/config/schema.py (or ``python -m jaxrl_llm.config``).
"""

import ml_collections

from jaxrl_llm.config import base_config


def get_config() -> ml_collections.ConfigDict:
    cfg = base_config()
    cfg.stage = "sft"
    cfg.run_dir = "runs/quickstart"

    cfg.model.preset = "llama-tiny"  # widened and deepened below; the vocabulary comes from the tokenizer
    cfg.model.hidden_size = 128
    cfg.model.intermediate_size = 384
    cfg.model.num_layers = 4
    cfg.model.num_heads = 4
    cfg.model.num_kv_heads = 2
    cfg.model.head_dim = 32
    cfg.tokenizer.train_vocab_size = 128

    cfg.data.path = "synthetic:arithmetic?n=8000&digits=2&ops=+&seed=0"
    cfg.data.eval_split = 0.025  # 200 held-out problems, never trained on
    cfg.render.template = "chatml"

    cfg.optimizer.lr = 2e-3  # small models take (and need) a large step; 5e-3 stalls on a plateau
    cfg.optimizer.warmup_steps = 50
    cfg.optimizer.weight_decay = 0.0

    cfg.train.steps = 600
    cfg.train.batch_size = 16
    cfg.train.seq_len = 128  # about five problems packed per row
    cfg.train.log_every = 50
    cfg.train.eval_every = 200
    cfg.train.eval_at_start = True
    cfg.train.save_every = 300
    cfg.train.eval_generate = 200
    cfg.train.eval_max_new_tokens = 8
    return cfg
