"""The field table: every config key, its default, its type, what values it allows and what it means.

This table is the one source of truth. ``base_config()`` builds the default ``ConfigDict`` from it, the
validator checks against it, the command line coerces override strings with it, and ``describe()`` (or
``python -m jaxrl_llm.config``) prints it. A ``Field.doc`` is the comment of its key.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable
from typing import Any

import ml_collections

STAGE_NAMES = ("sft", "pt", "rm", "dpo", "kto", "orpo", "simpo", "ppo", "grpo")
# Mirrors jaxrl_llm.models.config.SIZE_FIELDS (a test keeps them equal); not imported from there so that
# reading the table never loads JAX.
MODEL_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "max_seq_len",
)
# Mirror jaxrl_llm.data.records.KINDS and the formats of jaxrl_llm.data.sources (tests keep them equal);
# not imported from there so that reading the table never loads the readers.
DATA_KINDS = ("auto", "conversation", "preference", "unpaired", "prompt", "text")
DATA_FORMATS = (
    "auto",
    "jsonl",
    "json",
    "parquet",
    "text",
    "hf_disk",
    "tfds",
    "alpaca",
    "sharegpt",
    "openai",
    "gsm8k",
    "canonical",
)
# Mirrors the names of jaxrl_llm.render.templates.TEMPLATES and jaxrl_llm.render.render.MASK_MODES (a test
# keeps them equal); "" = the tokenizer's own chat template.
RENDER_TEMPLATES = ("", "chatml", "llama3", "qwen", "gemma", "plain")
# Mirrors jaxrl_llm.objectives.DPO_LOSS_TYPES (a test keeps them equal).
DPO_LOSS_TYPES = (
    "sigmoid",
    "robust",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
)
RENDER_MASKS = ("all", "last")
# Mirror jaxrl_llm.models.lora.PROJECTIONS and DEFAULT_TARGETS (a test keeps them equal).
LORA_MODULES = ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down")
LORA_TARGETS = r"(attn/(q|k|v|o)|mlp/(gate|up|down))$"
# Mirror jaxrl_llm.objectives (RL_ALGORITHMS, BASELINES, SCALES, POLICY_LOSSES, LOSS_AGGS, IMPORTANCE_LEVELS,
# KL_ESTIMATORS, rl.ROLLOUT_IS; a test keeps them equal), so that reading the table never loads JAX.
RL_ALGORITHMS = ("grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "cispo")
RL_BASELINES = ("group_mean", "leave_one_out", "batch_mean", "none")
RL_SCALES = ("group_std", "batch_std", "none")
RL_LOSSES = ("ppo_clip", "cispo")
RL_LOSS_AGGS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
RL_IMPORTANCE_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
ROLLOUT_IS = ("none", "token", "sequence")
_PRESET = " None = the rl.algorithm preset's value."


def _preset_names() -> tuple[str, ...]:
    # Imported on use so that reading the table never pulls in model code.
    from jaxrl_llm.models.presets import preset_names

    return preset_names()


@dataclasses.dataclass(frozen=True)
class Field:
    """One config key.

    ``lo``/``hi`` bound numbers (inclusive unless ``lo_open``/``hi_open``); ``special`` lists values
    allowed outside the bounds (e.g. -1 for "fill the remaining devices"); ``choices`` is a tuple or a
    function returning one, for choices that live elsewhere (model presets).
    """

    key: str
    default: Any
    doc: str
    type: type
    choices: tuple[Any, ...] | Callable[[], tuple[Any, ...]] | None = None
    lo: float | None = None
    hi: float | None = None
    nullable: bool = False
    lo_open: bool = False
    hi_open: bool = False
    special: tuple[Any, ...] = ()

    def allowed_choices(self) -> tuple[Any, ...] | None:
        return self.choices() if callable(self.choices) else self.choices

    def allowed(self) -> str:
        """What the key accepts, in words: ``float > 0``, ``one of 'a', 'b'``, ``None or int >= 1``."""
        choices = self.allowed_choices()
        if choices is not None:
            text = "one of " + ", ".join(repr(c) for c in choices)
        else:
            text = self.type.__name__
            if self.lo is not None and self.hi is not None:
                left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
                text += f" in {left}{self.lo:g}, {self.hi:g}{right}"
            elif self.lo is not None:
                text += f" {'>' if self.lo_open else '>='} {self.lo:g}"
            elif self.hi is not None:
                text += f" {'<' if self.hi_open else '<='} {self.hi:g}"
        if self.special:
            text += " or " + " or ".join(repr(s) for s in self.special)
        return f"None or {text}" if self.nullable else text


_SIZE_DOCS = {
    "vocab_size": "Vocabulary size (rows of the embedding table).",
    "hidden_size": "Width of the residual stream.",
    "intermediate_size": "Width of the MLP hidden layer.",
    "num_layers": "Number of decoder blocks.",
    "num_heads": "Number of query heads.",
    "num_kv_heads": "Number of key/value heads (grouped-query attention); must divide model.num_heads.",
    "head_dim": "Width of one attention head.",
    "max_seq_len": "Longest sequence the model supports (RoPE positions); train.seq_len must not exceed it.",
}
_SIZE_FIELDS = tuple(
    Field(f"model.{name}", None, f"{_SIZE_DOCS[name]} None = the preset's value.", int, lo=1, nullable=True)
    for name in MODEL_SIZES
)
_PARALLEL = "Devices along the {} mesh axis; -1 fills the devices the other axes leave (at most one -1)."

FIELDS: tuple[Field, ...] = (
    # Run.
    Field(
        "stage",
        "sft",
        "Which training stage to run; selects the trainer and the objective. pt = continued pre-training "
        "(the SFT loss on every token of raw text records).",
        str,
        STAGE_NAMES,
    ),
    Field("seed", 0, "Seed for parameter init, data order and sampling.", int, lo=0),
    Field("run_dir", "runs/default", "Directory for checkpoints, logs and the resolved config.", str),
    # Model.
    Field(
        "model.path",
        "",
        "HF checkpoint directory, or a previous run's run_dir (its final export, <run_dir>/final); when set "
        "the architecture and weights come from it and model.preset and the model sizes are ignored. "
        "Empty = build model.preset with fresh weights.",
        str,
    ),
    Field(
        "model.preset", "llama-tiny", "Named architecture (see jaxrl_llm.models.presets).", str, _preset_names
    ),
    *_SIZE_FIELDS,
    Field(
        "model.param_dtype",
        "float32",
        "Dtype the parameters are stored and updated in.",
        str,
        ("float32", "bfloat16"),
    ),
    Field(
        "model.dtype",
        "float32",
        "Compute dtype; logits and log-softmax stay float32.",
        str,
        ("float32", "bfloat16"),
    ),
    Field(
        "model.remat",
        "none",
        "Activation rematerialisation: none, full (recompute each block) or dots (save matmul outputs only).",
        str,
        ("none", "full", "dots"),
    ),
    Field("model.scan_layers", False, "Run the decoder blocks under one lax.scan (faster compiles).", bool),
    Field(
        "model.attention",
        "auto",
        "Attention kernel. auto: cuDNN flash attention on NVIDIA GPUs (bfloat16/float16) and the Pallas splash "
        "kernel on TPU where a call's shapes allow, the einsum path otherwise (CPU); xla: the einsum path "
        "everywhere; cudnn, splash: that kernel, falling back to the einsum path (logged once, with why) where "
        "it cannot run (e.g. Gemma 2's soft-capping on cuDNN). Decode steps always read only the filled cache.",
        str,
        ("auto", "xla", "cudnn", "splash"),
    ),
    # Tokenizer.
    Field(
        "tokenizer.path",
        "",
        "HF tokenizer directory or SentencePiece .model file. Empty = the tokenizer in model.path.",
        str,
    ),
    Field(
        "tokenizer.train_vocab_size",
        None,
        "With no tokenizer.path and no model.path: train a byte-level BPE tokenizer (ChatML template, digits "
        "split one per token) of this size on the training data and save it in <run_dir>/tokenizer; a model "
        "built from scratch then takes its vocabulary size. None = a tokenizer must be given.",
        int,
        lo=64,
        nullable=True,
    ),
    # Rendering.
    Field(
        "render.template",
        "",
        "Chat template: empty = the tokenizer's own Jinja template; else a built-in: chatml, llama3, qwen "
        "(Qwen2.5 ChatML with tool calls), gemma, plain (base models: 'User: ... Assistant: ...'). Only qwen "
        "(and a tokenizer's own, when it does) renders tools.",
        str,
        RENDER_TEMPLATES,
    ),
    Field(
        "render.mask",
        "all",
        "Which assistant turns the loss trains on: all, or only the last (earlier turns are context). The "
        "end-of-turn token is always trained on, even when the pad id equals the EOS id.",
        str,
        RENDER_MASKS,
    ),
    Field(
        "render.parity_sample",
        100,
        "Records checked for train/inference parity when the data loads (each trained turn's generation "
        "prompt must be a token prefix of it); a failure stops the run naming the record, turn and first "
        "differing token. 0 = no check.",
        int,
        lo=0,
    ),
    # Parallelism.
    Field("parallel.data", -1, _PARALLEL.format("data-parallel"), int, lo=1, special=(-1,)),
    Field("parallel.fsdp", 1, _PARALLEL.format("FSDP (parameter-sharding)"), int, lo=1, special=(-1,)),
    Field("parallel.tensor", 1, _PARALLEL.format("tensor-parallel"), int, lo=1, special=(-1,)),
    Field(
        "parallel.coordinator_address",
        "",
        "host:port of process 0 for a multi-process run without a cluster manager (several processes on "
        "one machine, GPU hosts). Empty = $JAXRL_COORDINATOR if set, else single process (or auto-detected "
        "on TPU pods and SLURM).",
        str,
    ),
    Field(
        "parallel.num_processes",
        None,
        "Processes in a multi-process run (one per host). None = $JAXRL_NUM_PROCESSES, else 1.",
        int,
        lo=1,
        nullable=True,
    ),
    Field(
        "parallel.process_id",
        None,
        "This process's index, 0 .. parallel.num_processes - 1. None = $JAXRL_PROCESS_ID, else 0.",
        int,
        lo=0,
        nullable=True,
    ),
    # Optimizer.
    Field("optimizer.name", "adamw", "Optimizer.", str, ("adamw", "adafactor", "lion", "sgd")),
    Field("optimizer.lr", 3e-4, "Peak learning rate (reached after warmup).", float, lo=0, lo_open=True),
    Field("optimizer.weight_decay", 0.0, "Decoupled weight decay.", float, lo=0),
    Field(
        "optimizer.b1",
        0.9,
        "First-moment decay (adamw, lion); momentum for sgd.",
        float,
        lo=0,
        hi=1,
        hi_open=True,
    ),
    Field("optimizer.b2", 0.95, "Second-moment decay (adamw, lion).", float, lo=0, hi=1, hi_open=True),
    Field("optimizer.eps", 1e-8, "Denominator epsilon (adamw).", float, lo=0, lo_open=True),
    Field(
        "optimizer.schedule",
        "cosine",
        "Learning-rate shape after warmup: constant, cosine decay to 0, or linear decay to 0.",
        str,
        ("constant", "cosine", "linear"),
    ),
    Field("optimizer.warmup_steps", 100, "Linear warmup steps from 0 to optimizer.lr.", int, lo=0),
    Field(
        "optimizer.clip_norm",
        1.0,
        "Global gradient-norm clip. None = no clipping.",
        float,
        lo=0,
        nullable=True,
    ),
    Field(
        "optimizer.freeze",
        "",
        "Regex on '/'-joined parameter paths (e.g. 'embed|blocks/attn'): matching parameters are frozen "
        "(zero update, no optimizer state). Empty = train every parameter.",
        str,
    ),
    Field(
        "optimizer.state_dtype",
        "param",
        "dtype of the optimizer's state (moments): param (each parameter's own dtype) or float32 (moments and "
        "the update computed in float32, then cast to the parameter's dtype: bfloat16 parameters with float32 "
        "optimizer state; no float32 master copy of the weights).",
        str,
        ("param", "float32"),
    ),
    # LoRA (jaxrl_llm.models.lora).
    Field(
        "lora.rank",
        0,
        "LoRA rank r: > 0 trains low-rank adapters (y = W x + B A dropout(x) * alpha / r, B zero at the start) "
        "on the targeted projections of a frozen base, in every stage; only the adapters (and a new score or "
        "value head) get gradients, optimizer state and checkpoints, and a reference model is the base with "
        "the adapters off. 0 = train the weights themselves.",
        int,
        lo=0,
    ),
    Field(
        "lora.alpha",
        None,
        "LoRA alpha (the adapters' scale is alpha / rank). None = 2 x lora.rank.",
        float,
        lo=0,
        lo_open=True,
        nullable=True,
    ),
    Field(
        "lora.dropout",
        0.0,
        "Dropout on the adapters' input while training.",
        float,
        lo=0,
        hi=1,
        hi_open=True,
    ),
    Field(
        "lora.targets",
        LORA_TARGETS,
        "Regex searched in each projection's path: blocks/attn/{q,k,v,o} and blocks/mlp/{gate,up,down} (e.g. "
        "'attn/(q|v)$'); the default targets all seven.",
        str,
    ),
    Field(
        "lora.save_adapter",
        True,
        "Besides the merged HF checkpoint in <run_dir>/final, write the adapters to <run_dir>/adapter in "
        "PEFT's format (peft.PeftModel.from_pretrained(base, dir) loads them onto model.path).",
        bool,
    ),
    # Training loop.
    Field("train.steps", 1000, "Optimizer steps to run.", int, lo=1),
    Field(
        "train.epochs",
        None,
        "Passes over the training data instead of train.steps: train.steps becomes ceil(epochs x the steps of "
        "one pass) (batches of packed/bucketed rows, pairs, or RL iterations of rl.prompts_per_iteration), "
        "counted at start. None = train.steps.",
        float,
        lo=0,
        lo_open=True,
        nullable=True,
    ),
    Field("train.batch_size", 8, "Sequences per optimizer step (global, across devices).", int, lo=1),
    Field(
        "train.grad_accum_steps",
        1,
        "Micro-batches per optimizer step; must divide train.batch_size.",
        int,
        lo=1,
    ),
    Field(
        "train.seq_len",
        256,
        "Tokens per training sequence (pad/truncate to this); at least 2: an input token and its next-token target.",
        int,
        lo=2,
    ),
    Field("train.log_every", 10, "Log metrics every this many steps.", int, lo=1),
    Field("train.eval_every", 100, "Evaluate every this many steps.", int, lo=1),
    Field("train.save_every", 100, "Save a checkpoint every this many steps.", int, lo=1),
    Field("train.keep_checkpoints", 3, "How many recent checkpoints to keep on disk.", int, lo=1),
    Field(
        "train.resume",
        True,
        "Resume from the latest checkpoint in run_dir when there is one (params, optimizer, step, RNG and "
        "data position). False = refuse to start in a run_dir that has checkpoints.",
        bool,
    ),
    Field(
        "train.eval_steps",
        None,
        "Batches per evaluation. None = one full pass over the evaluation set.",
        int,
        lo=1,
        nullable=True,
    ),
    Field(
        "train.resume_from_step",
        None,
        "Resume from this checkpoint step instead of the latest; later checkpoints move to "
        "<run_dir>/checkpoints_after_<step>/. None = the latest.",
        int,
        lo=1,
        nullable=True,
    ),
    Field(
        "train.max_hours",
        None,
        "Wall-clock budget of this process's training loop: when reached, save a checkpoint and exit 0 (as on "
        "SIGTERM); rerun the same command to continue. None = no budget.",
        float,
        lo=0,
        lo_open=True,
        nullable=True,
    ),
    Field(
        "train.nonfinite_max_consecutive",
        10,
        "Steps in a row whose loss or gradient norm is not finite (each is skipped: parameters unchanged) "
        "before train.nonfinite_action is taken.",
        int,
        lo=1,
    ),
    Field(
        "train.nonfinite_action",
        "stop",
        "After train.nonfinite_max_consecutive non-finite steps: 'stop' (exit 2, nothing exported, the last "
        "checkpoint kept) or 'rollback' (restore the last checkpoint, learning rate x train.rollback_lr_factor).",
        str,
        ("stop", "rollback"),
    ),
    Field(
        "train.rollback_lr_factor",
        0.5,
        "Learning-rate factor applied at each rollback (cumulative).",
        float,
        lo=0,
        hi=1,
        lo_open=True,
    ),
    Field("train.max_rollbacks", 3, "Rollbacks allowed in one run before it stops instead.", int, lo=0),
    Field("train.eval_at_start", False, "Also evaluate before the first step (a baseline).", bool),
    Field(
        "train.eval_generate",
        0,
        "Held-out conversations whose last assistant turn is generated greedily at each evaluation and "
        "compared with the reference (eval/exact_match, whitespace-stripped). 0 = off.",
        int,
        lo=0,
    ),
    Field("train.eval_max_new_tokens", 32, "Token budget of each generated evaluation answer.", int, lo=1),
    Field(
        "train.peak_flops",
        None,
        "Peak FLOP/s of one device for the MFU estimate. None = a table of known accelerators, or measured "
        "at start on CPU.",
        float,
        lo=0,
        lo_open=True,
        nullable=True,
    ),
    Field(
        "train.export_hf",
        True,
        "At the end, save the model and tokenizer as an HF checkpoint in <run_dir>/final (what model.path "
        "of a later stage can point to).",
        bool,
    ),
    # Data.
    Field(
        "data.path",
        "",
        "Dataset file or directory (JSONL, JSON array, Parquet, HF save_to_disk folder, TFDS name, ...). "
        "Check it with python -m jaxrl_llm.data validate PATH.",
        str,
    ),
    Field(
        "data.format",
        "auto",
        "How to read and convert data.path: auto decides by the file name and the first record.",
        str,
        DATA_FORMATS,
    ),
    Field(
        "data.kind",
        "auto",
        "Canonical record kind; auto = the one the format fixes, else the first valid record's. Every "
        "record must be of this kind.",
        str,
        DATA_KINDS,
    ),
    Field(
        "data.dataset_info",
        "",
        "LLaMA-Factory dataset_info.json registry; set with data.name to load a registered dataset.",
        str,
    ),
    Field("data.name", "", "Dataset name inside data.dataset_info.", str),
    Field(
        "data.eval_path",
        "",
        "Evaluation dataset, read like data.path (same format, kind and filters). Empty = data.eval_split.",
        str,
    ),
    Field(
        "data.eval_split",
        0.0,
        "Fraction of the training records held out for evaluation (seeded) when data.eval_path is empty; "
        "0 = no evaluation.",
        float,
        lo=0,
        hi=0.5,
        hi_open=True,
    ),
    Field(
        "data.packing",
        "pack",
        "How examples become fixed-shape rows: pack (several documents per row, attention kept apart) or "
        "bucket (one document per row, padded to the smallest power-of-two length that holds it).",
        str,
        ("pack", "bucket"),
    ),
    Field(
        "data.process_split",
        "rows",
        "How the processes of a multi-process run share the data: rows (every process encodes every record "
        "and feeds its rows of the same global batches: results do not depend on the process count; needed "
        "by bucketing, the pair stages and RL) or records (a disjoint shard of the records each: no host "
        "encodes more than its share; packed sft/pt only, a fixed number of steps).",
        str,
        ("rows", "records"),
    ),
    Field(
        "data.workers",
        0,
        "Grain worker processes that render and tokenize (0 = in the training process).",
        int,
        lo=0,
    ),
    Field(
        "data.on_error",
        "raise",
        "What a record that cannot be read or validated does: raise stops with its file, line and field; "
        "skip counts it and writes it to <run_dir>/rejects.jsonl.",
        str,
        ("raise", "skip"),
    ),
    Field(
        "data.max_turns",
        None,
        "Drop records whose longest conversation has more messages than this (system and tool messages "
        "count). None = no limit.",
        int,
        lo=1,
        nullable=True,
    ),
    Field(
        "data.min_tokens",
        None,
        "Drop records whose shortest rendered sequence (through the tokenizer and render.template) has "
        "fewer tokens than this. None = no bound.",
        int,
        lo=1,
        nullable=True,
    ),
    Field(
        "data.max_tokens",
        None,
        "Drop records whose longest rendered sequence has more tokens than this (a preference record counts "
        "prompt + chosen and prompt + rejected, an RL prompt its generation prompt). None = no bound.",
        int,
        lo=1,
        nullable=True,
    ),
    Field("data.dedup", True, "Drop exact duplicates (text compared with whitespace runs collapsed).", bool),
    Field("data.drop_empty_turns", True, "Drop records with an empty or whitespace-only message.", bool),
    Field(
        "data.check_tool_calls",
        True,
        "Drop records with a tool call whose arguments are not a JSON object, or that names a tool the "
        "record's tools do not declare.",
        bool,
    ),
    Field(
        "data.check_role_order",
        True,
        "Drop records whose roles are out of order: system only first, user and assistant alternate "
        "starting with user, tool results only after an assistant tool call.",
        bool,
    ),
    Field(
        "pref.beta",
        0.1,
        "Preference stages' beta: the KL coefficient of dpo and kto (0.1 is usual) and orpo's odds-ratio weight; "
        "simpo's reward scale (the paper uses 2-2.5).",
        float,
        lo=0,
        lo_open=True,
    ),
    Field(
        "pref.loss_type",
        "sigmoid",
        "stage=dpo: the DPO loss (jaxrl_llm.objectives.dpo_loss).",
        str,
        choices=DPO_LOSS_TYPES,
    ),
    Field(
        "pref.label_smoothing",
        0.0,
        "stage=dpo/simpo: probability that a preference label is flipped (conservative DPO, robust, exo_pair).",
        float,
        lo=0,
        hi=0.5,
        hi_open=True,
    ),
    Field(
        "pref.reference_free",
        False,
        "stage=dpo: no reference model (its log-probs taken as 0) instead of a frozen copy of the initial policy.",
        bool,
    ),
    Field(
        "pref.precompute_ref",
        False,
        "stage=dpo: compute the reference model's log-probs of every training and evaluation pair in one pass "
        "before training (then the reference is freed) instead of on every batch.",
        bool,
    ),
    Field(
        "pref.sft_weight",
        0.0,
        "stage=dpo: weight of an added NLL term on the chosen answers (RPO).",
        float,
        lo=0,
    ),
    Field("pref.simpo_gamma", 1.0, "stage=simpo: the target reward margin gamma.", float, lo=0),
    Field(
        "pref.desirable_weight",
        1.0,
        "stage=kto: weight lambda_D of the desirable examples' losses (the paper keeps lambda_D * n_D / "
        "(lambda_U * n_U) in [1, 4/3]).",
        float,
        lo=0,
        lo_open=True,
    ),
    Field(
        "pref.undesirable_weight",
        1.0,
        "stage=kto: weight lambda_U of the undesirable examples' losses.",
        float,
        lo=0,
        lo_open=True,
    ),
    Field(
        "pref.center_coef",
        0.0,
        "stage=rm: weight of the (chosen + rejected)^2 term that keeps scores centred on 0.",
        float,
        lo=0,
    ),
    # Rollout.
    Field(
        "rollout.max_new_tokens",
        256,
        "RL stages: the most tokens a completion may have (it also ends at the end-of-turn token or a stop string).",
        int,
        lo=1,
    ),
    Field("rollout.temperature", 1.0, "Sampling temperature of the RL rollouts (0 = greedy).", float, lo=0),
    Field(
        "rollout.top_p", 1.0, "Nucleus sampling of the rollouts (1 = off).", float, lo=0, hi=1, lo_open=True
    ),
    Field("rollout.top_k", 0, "Top-k sampling of the rollouts (0 = off).", int, lo=0),
    Field("rollout.min_p", 0.0, "Min-p sampling of the rollouts (0 = off).", float, lo=0, hi=1, hi_open=True),
    Field(
        "rollout.stop",
        [],
        "Stop strings that end a completion (left out of its text); a list, JSON on the command line.",
        list,
    ),
    Field(
        "rollout.dtype",
        "",
        "Compute dtype of the rollouts; empty = model.dtype. bfloat16 rollouts with float32 updates is where "
        "rl.rollout_is (rollout correction) matters.",
        str,
        ("", "float32", "bfloat16"),
    ),
    Field(
        "rollout.mesh",
        "",
        "A mesh of its own for the RL rollouts, e.g. 'data=4' or 'fsdp=2,tensor=2': it takes the last devices "
        "and training the ones before (parallel.* sizes them; -1 fills them); the policy's weights are "
        "resharded from the training layout to the rollout layout every iteration (time/reshard_s); with LoRA "
        "only the adapters move, the base is placed there once. With several processes it takes an equal "
        "share of every process's devices, and the weights move through the hosts. Empty = rollouts share "
        "the training mesh.",
        str,
    ),
    Field(
        "rollout.off_policy",
        False,
        "One-step off-policy RL (needs rollout.mesh): iteration k+1's rollouts are generated on the rollout "
        "mesh by the weights before iteration k's update while that update runs, so each update learns from "
        "samples one step stale; rl.rollout_is (the rollout correction) must be on.",
        bool,
    ),
    # RL.
    Field(
        "rl.algorithm",
        "grpo",
        "The GRPO-family member whose settings the rl.* keys left None take: grpo, dr_grpo (no std scaling, "
        "constant-length normaliser), dapo (clip-higher, token mean, dynamic sampling), gspo (sequence ratio), "
        "rloo (leave-one-out baseline), reinforce_pp (batch-normalised), cispo (clipped IS-weight REINFORCE).",
        str,
        RL_ALGORITHMS,
    ),
    Field("rl.prompts_per_iteration", 8, "RL prompts sampled each iteration.", int, lo=1),
    Field(
        "rl.group_size",
        8,
        "Completions sampled per prompt (G); advantages compare a prompt's group.",
        int,
        lo=1,
    ),
    Field(
        "rl.num_iterations",
        1,
        "Epochs (mu) of updates over each iteration's samples; above 1 the pre-update log-probs get their "
        "own pass.",
        int,
        lo=1,
    ),
    Field(
        "rl.minibatches",
        1,
        "Optimizer updates per epoch: the iteration's samples split into this many minibatches.",
        int,
        lo=1,
    ),
    Field("rl.baseline", None, "Advantage baseline." + _PRESET, str, RL_BASELINES, nullable=True),
    Field("rl.scale", None, "Advantage scale (unbiased std)." + _PRESET, str, RL_SCALES, nullable=True),
    Field("rl.loss", None, "Policy loss: ppo_clip or cispo." + _PRESET, str, RL_LOSSES, nullable=True),
    Field(
        "rl.loss_agg",
        None,
        "How token losses become the loss: seq_mean_token_mean (GRPO), token_mean (DAPO), "
        "seq_mean_token_sum_norm (Dr.GRPO, divided by rollout.max_new_tokens)." + _PRESET,
        str,
        RL_LOSS_AGGS,
        nullable=True,
    ),
    Field(
        "rl.importance_level",
        None,
        "Importance ratio per token, or per sequence (GSPO)." + _PRESET,
        str,
        RL_IMPORTANCE_LEVELS,
        nullable=True,
    ),
    Field("rl.clip_low", None, "Ratio clip below 1 (1 - clip_low)." + _PRESET, float, lo=0, nullable=True),
    Field(
        "rl.clip_high",
        None,
        "Ratio clip above 1 (1 + clip_high; DAPO's clip-higher)." + _PRESET,
        float,
        lo=0,
        nullable=True,
    ),
    Field(
        "rl.dual_clip",
        None,
        "Dual-clip PPO: caps a negative-advantage token's loss at -c * A (c > 1). None = off.",
        float,
        lo=1,
        lo_open=True,
        nullable=True,
    ),
    Field(
        "rl.beta",
        0.0,
        "KL penalty coefficient against the reference (a frozen copy of the initial policy, not made at all "
        "when 0).",
        float,
        lo=0,
    ),
    Field(
        "rl.kl_estimator", "k3", "KL estimator of the penalty (Schulman's k1, k2, k3).", str, KL_ESTIMATORS
    ),
    Field(
        "rl.reference_mesh",
        "",
        "A mesh of its own for the reference model (grpo with rl.beta > 0, ppo with a KL term), e.g. "
        "'data=2': the reference's weights live there (none on the training devices; with LoRA a copy of the "
        "base) and its log-probs of each iteration's samples are computed there and sent to the training "
        "mesh (time/reference_s). It takes devices after rollout.mesh's (from the end). Empty = the "
        "reference shares the training mesh.",
        str,
    ),
    Field(
        "rl.advantage_eps",
        1e-4,
        "Added to the standard deviation that scales advantages.",
        float,
        lo=0,
        lo_open=True,
    ),
    Field(
        "rl.dynamic_sampling",
        None,
        "DAPO's dynamic sampling: groups whose rewards are all equal (no signal) are dropped and refilled from "
        "up to rl.dynamic_sampling_rounds extra rollouts of new prompts." + _PRESET,
        bool,
        nullable=True,
    ),
    Field(
        "rl.dynamic_sampling_rounds",
        2,
        "Extra rollouts an iteration may make to refill dropped groups (each iteration draws the prompts of "
        "every round; groups still missing after the last are left out of the loss, and counted).",
        int,
        lo=1,
    ),
    Field(
        "rl.mask_truncated",
        False,
        "Leave completions cut at rollout.max_new_tokens out of the loss and the advantages (DAPO's overlong "
        "filtering; the overlong reward is the soft alternative).",
        bool,
    ),
    Field(
        "rl.rollout_is",
        "none",
        "Rollout correction: truncated importance weights min(pi_old / pi_sampler, rl.rollout_is_cap) per token "
        "or per sequence on each token's loss. The mismatch is logged either way.",
        str,
        ROLLOUT_IS,
    ),
    Field(
        "rl.rollout_is_cap", 2.0, "Upper bound of the rollout-correction weights.", float, lo=0, lo_open=True
    ),
    Field(
        "rl.eval_prompts",
        None,
        "Held-out prompts answered greedily at each evaluation. None = all of them.",
        int,
        lo=1,
        nullable=True,
    ),
    Field(
        "rl.log_samples",
        4,
        "Completions written at every log step (TensorBoard text and <run_dir>/samples.jsonl).",
        int,
        lo=0,
    ),
    Field(
        "rl.critic_path",
        "",
        "stage=ppo: the critic's starting point, a reward model's HF checkpoint or stage=rm run directory (the "
        "policy's tokenizer); empty = a copy of the policy's backbone with a zero value head.",
        str,
    ),
    Field("rl.vf_coef", 0.1, "stage=ppo: weight of the value loss beside the policy loss.", float, lo=0),
    Field(
        "rl.value_clip",
        0.2,
        "stage=ppo: values move at most this far from the sampling critic's.",
        float,
        lo=0,
    ),
    Field("rl.gamma", 1.0, "stage=ppo: GAE discount.", float, lo=0, hi=1),
    Field("rl.lam", 0.95, "stage=ppo: GAE lambda.", float, lo=0, hi=1),
    Field(
        "rl.kl_coef",
        0.05,
        "stage=ppo: coefficient of the per-token KL to the reference subtracted from the rewards (0 = no "
        "reference model).",
        float,
        lo=0,
    ),
    Field(
        "rl.kl_target",
        None,
        "stage=ppo: adapt rl.kl_coef towards this KL per sequence (Ziegler et al. 2019). None = fixed.",
        float,
        lo=0,
        lo_open=True,
        nullable=True,
    ),
    Field(
        "rl.kl_horizon", 10000.0, "stage=ppo: the adaptive KL controller's horizon (samples).", float, lo=1
    ),
    Field(
        "rl.whiten_advantages",
        True,
        "stage=ppo: normalise the advantages over each iteration's tokens.",
        bool,
    ),
    Field(
        "reward.functions",
        [],
        "Reward components of the RL stages: a list of {name, weight, params, label} (label names a "
        "component in the logs; set it to use one function twice). On the command line a JSON list. "
        "python -m jaxrl_llm.reward lists the functions and their params.",
        list,
    ),
    Field(
        "reward.mesh",
        "",
        "A mesh of its own for the learned reward models of reward.functions (reward_model), e.g. 'data=2': "
        "their weights live there, sharded, and they score each rollout there; it takes devices after "
        "rollout.mesh and rl.reference_mesh (from the end). Empty = the first training device holds them.",
        str,
    ),
    Field(
        "reward.on_error",
        "zero",
        "A host reward that raises, returns NaN or times out scores 0 for that sample ('zero'), or also "
        "drops the sample from the loss ('exclude'); counted and logged either way.",
        str,
        choices=("zero", "exclude"),
    ),
    Field(
        "reward.host_timeout_s",
        30.0,
        "Time limit of one host reward call, seconds (at most a day: a larger one overflows the thread wait).",
        float,
        lo=0,
        hi=86400.0,
        lo_open=True,
    ),
    Field(
        "reward.workers",
        None,
        "Threads running host rewards in parallel. None = 4 per CPU core.",
        int,
        lo=1,
        nullable=True,
    ),
    # Metric loggers (jaxrl_llm.observe.reporting).
    Field(
        "observe.report_to",
        "tensorboard",
        "Where metrics go beside metrics.jsonl, comma-separated: 'tensorboard' (always on) and 'wandb' "
        "(Weights & Biases: scalars, histograms, sampled completions and the config; pip install wandb). "
        "E.g. observe.report_to=wandb.",
        str,
    ),
    Field(
        "observe.wandb_project",
        "jaxrl_llm",
        "The W&B project of the run; the run's id is kept in <run_dir>/wandb_run_id so a resumed run continues "
        "the same W&B run.",
        str,
    ),
    Field(
        "observe.wandb_mode",
        "offline",
        "'offline' writes the W&B run under <run_dir>/wandb with no network (wandb sync uploads it later); "
        "'online' streams it (needs wandb login); 'disabled' logs nothing.",
        str,
        choices=("offline", "online", "disabled"),
    ),
    # The online canary.
    Field(
        "canary.every",
        0,
        "Answer the canary prompts greedily every this many steps (and at step 0, the baseline), log them "
        "(canary/..., TensorBoard text, canary.jsonl) and apply the canary rules. 0 = off.",
        int,
        lo=0,
    ),
    Field(
        "canary.prompts",
        [],
        "Canary prompts: a JSON list of strings, message lists or records {prompt, ground_truth}.",
        list,
    ),
    Field("canary.path", "", "A JSON Lines file of canary prompt records (added to canary.prompts).", str),
    Field("canary.max_new_tokens", 32, "Token budget of each canary answer.", int, lo=1),
    Field(
        "canary.reward",
        [],
        "How canary answers are scored: reward functions as reward.functions. Empty = reward.functions, "
        "else exact match with each prompt's ground_truth, else no score.",
        list,
    ),
    Field(
        "canary.action",
        "halt",
        "When a canary rule fires: 'halt' (exit 2, the checkpoints kept) or 'rollback' (to the last checkpoint "
        "at or before the last canary that passed, learning rate x train.rollback_lr_factor; at most "
        "train.max_rollbacks, then halt).",
        str,
        ("halt", "rollback"),
    ),
    Field("canary.min_score", None, "Rule: the canary score fell below this floor.", float, nullable=True),
    Field(
        "canary.max_drop",
        None,
        "Rule: the canary score fell more than this below its best so far.",
        float,
        lo=0,
        nullable=True,
    ),
    Field(
        "canary.max_kl",
        None,
        "Rule: the mean KL(policy || reference) on the canary answers rose above this; the reference is the "
        "stage's (dpo, kto, grpo/ppo with a KL term), else a frozen copy of the initial policy kept for it.",
        float,
        lo=0,
        nullable=True,
    ),
    Field(
        "canary.min_entropy",
        None,
        "Rule: the policy's mean entropy on the canary answers (nats) fell below this.",
        float,
        lo=0,
        nullable=True,
    ),
    Field(
        "canary.min_length",
        None,
        "Rule: the mean canary answer length (tokens) fell below this.",
        float,
        lo=0,
        nullable=True,
    ),
    # Named evaluation sets (jaxrl_llm.train.eval_sets).
    Field(
        "eval.sets",
        [],
        "Named evaluation sets, evaluated every train.eval_every steps by the evaluator of python -m "
        "jaxrl_llm.eval and logged as eval/<name>/<metric>: a list of {name, path, format, kind, limit, n, "
        "temperature, top_p, max_new_tokens, verifiers, batch_size} (only name and path required; verifiers as "
        "reward.functions, default reward.functions else math_verify). On the command line a JSON list, e.g. "
        '\'[{"name": "gsm8k", "path": "test.jsonl", "format": "gsm8k", "limit": 64}]\'.',
        list,
    ),
)

# Keys of the RL roles' meshes of their own, in the order they take devices from the end.
ROLE_MESHES = ("rollout.mesh", "rl.reference_mesh", "reward.mesh")

SECTIONS = {
    "": "Run",
    "model": "Model architecture and numerics",
    "tokenizer": "Tokenizer",
    "render": "Chat template and loss mask (jaxrl_llm.render)",
    "parallel": "Device mesh (product of the axes = number of devices)",
    "optimizer": "Optimizer and learning-rate schedule",
    "lora": "LoRA adapters on a frozen base (jaxrl_llm.models.lora)",
    "train": "Training loop",
    "observe": "Metric loggers beside TensorBoard and metrics.jsonl (jaxrl_llm.observe)",
    "data": "Dataset, validation and quality filters (python -m jaxrl_llm.data validate checks one)",
    "pref": "Preference and reward-model stages (rm, dpo, kto, orpo, simpo)",
    "rollout": "Sampling of the RL stages' completions (jaxrl_llm.rollout)",
    "rl": "Online RL stages (grpo, ppo): iterations, advantages, the policy loss, PPO's critic",
    "reward": "Rewards of the RL stages (jaxrl_llm.reward)",
    "eval": "Named evaluation sets, evaluated during training (as python -m jaxrl_llm.eval does offline)",
    "canary": "Online canary: prompts answered during training, and the rules that halt or roll back a run",
}

FIELDS_BY_KEY: dict[str, Field] = {f.key: f for f in FIELDS}


def section_of(key: str) -> str:
    return key.rpartition(".")[0]


def base_config() -> ml_collections.ConfigDict:
    """The default config, nested by the dots of the field keys.

    Type safety is off so that a wrong type reaches ``validate`` (which names the key and what is allowed)
    instead of failing inside ml-collections with its own message.
    """
    tree: dict[str, Any] = {}
    for field in FIELDS:
        *parents, leaf = field.key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = field.default
    return ml_collections.ConfigDict(tree, type_safe=False)


def describe() -> str:
    """Every key with its default, what it allows and what it means, grouped by section."""
    lines: list[str] = []
    for section, title in SECTIONS.items():
        lines.append(f"# {title}")
        for field in FIELDS:
            if section_of(field.key) != section:
                continue
            lines.append(f"{field.key} = {field.default!r}    ({field.allowed()})")
            lines += textwrap.wrap(field.doc, width=100, initial_indent="    ", subsequent_indent="    ")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
