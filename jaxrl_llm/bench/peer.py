"""Same-run peers for ``bench train``: the same weights, token ids, batch and lengths through TRL.

Each peer runs a TRL trainer (HF transformers ``Trainer``, PyTorch, CPU) for ``1 + repeats`` optimizer
steps on data that is already tokenized, and times each step from ``on_step_begin`` to ``on_step_end``:
forward(s), backward, gradient clipping, the AdamW update, the scheduler and ``zero_grad``; collating the
next batch happens before ``on_step_begin`` and is not timed, as our batch is on the device before the step.

- ``trl_sft``: ``SFTTrainer`` on rows of ``input_ids``, every token a target.
- ``trl_dpo``: ``DPOTrainer`` on ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` (its collator
  concatenates them into the ``2B`` rows ``[chosen..., rejected...]`` with the completions as targets),
  sigmoid loss with our ``beta``, and TRL's own reference model: a second copy of the checkpoint loaded by
  the trainer and run under ``no_grad`` in every step (``reference="live"``), or its log-probs precomputed
  in one pass before training (``"precomputed"``, TRL's ``precompute_ref_log_probs``; not timed).
- ``trl_rm``: ``RewardTrainer`` with ``AutoModelForSequenceClassification`` (the exported score head) on
  ``chosen_ids`` / ``rejected_ids`` (prompt + completion of each side), Bradley-Terry loss.
- ``trl_grpo``: ``GRPOTrainer``, where a step is a whole iteration: sampling ``group`` completions per
  prompt with the trainer's model (HF ``generate``, temperature 1, no top-k/top-p, no vLLM; timed alone as
  the rollout), random rewards, group-standardized advantages, then one forward and backward over the
  ``P * group`` rows and the update. Matched: one generation batch of ``P * group`` rows per optimizer step
  (``steps_per_generation=1``; TRL's batch sizes count completions), ``num_iterations=1`` (so no old-policy
  forward), ``beta=0`` (no reference model), prompts in order. Forced: every completion is exactly
  ``new_tokens`` long (EOS banned by ``min_new_tokens``, cut by ``max_completion_length``), and the prompts
  are our token ids, written as text that a tokenizer whose vocabulary is the ids reads back unchanged.
  The loss is TRL's default (``"dapo"``).

The configuration is matched to ours rather than left at TRL's defaults, which differ from transformers'
and from ours: TRL turns gradient checkpointing on and ``bf16`` on unless told otherwise (both off here
for float32; ``bf16`` autocast when the compute dtype is bfloat16), no packing, no padding (all rows have
the same length, and ``pad_to_multiple_of`` is off), no truncation (``max_length`` is the row length),
one micro-batch per step, and AdamW with our default betas, epsilon, weight decay, clip norm and a constant
learning rate. TRL's DPO tokenization (which appends an EOS to each completion) is bypassed so it sees
exactly our token ids. Every peer checks, on the batch its ``compute_loss`` receives, that it processes
the rows and tokens the benchmark counts: ``B`` rows for SFT, and for pairs the ``2B`` sequences prompt +
completion (ours reads a pair as one row ``prompt | chosen | rejected``, the prompt once, but counts the
same ``2B`` sequences); GRPO's also checks that each generation started from our prompt ids and returned
``P * group`` completions of ``new_tokens`` tokens. torch, trl, transformers and datasets are imported
here only: they are test-only dependencies.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def _pad_tokenizer():
    """The smallest tokenizer TRL accepts (it needs one with a pad token): never called on the hot path,
    since the rows are already token ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@contextlib.contextmanager
def _quiet():
    """transformers' and datasets' logs, progress bars and warnings off for the run, restored after."""
    import datasets
    import transformers

    verbosity = transformers.logging.get_verbosity(), datasets.utils.logging.get_verbosity()
    bars = datasets.utils.logging.is_progress_bar_enabled()
    bars_hf = transformers.utils.logging.is_progress_bar_enabled()
    tqdm_disable = os.environ.get("TQDM_DISABLE")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" in from_pretrained
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    os.environ["TQDM_DISABLE"] = "1"  # DPOTrainer's reference precompute loop
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if tqdm_disable is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_disable
        transformers.logging.set_verbosity(verbosity[0])
        if bars_hf:
            transformers.utils.logging.enable_progress_bar()
        datasets.utils.logging.set_verbosity(verbosity[1])
        if bars:
            datasets.enable_progress_bars()


def _checkpoint(model, tmp: str) -> Path:
    """``model`` (one of ours) exported with ``save_hf``, or the path of a checkpoint already exported."""
    from ..models import save_hf

    if isinstance(model, str | os.PathLike):
        return Path(model)
    return save_hf(model, Path(tmp) / "model")


def _matched_args(out_dir: Path, batch: int, steps: int, dtype: str) -> dict:
    """``TrainingArguments`` every peer shares: our optimizer and precision, one micro-batch a step, rows
    in order, no logging, saving, evaluation or gradient checkpointing, CPU."""
    from ..config import base_config

    opt = base_config().optimizer
    return dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_steps=steps,
        gradient_checkpointing=False,
        bf16=dtype == "bfloat16",
        fp16=False,
        optim="adamw_torch",
        learning_rate=float(opt.lr),
        adam_beta1=float(opt.b1),
        adam_beta2=float(opt.b2),
        adam_epsilon=float(opt.eps),
        weight_decay=float(opt.weight_decay),
        max_grad_norm=float(opt.clip_norm) if opt.clip_norm is not None else 0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        train_sampling_strategy="sequential",
        logging_strategy="no",
        logging_steps=10**9,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=True,
        seed=0,
    )


def _describe_rows(inputs: dict) -> dict:
    """The shape of a batch of rows (``input_ids``, with an ``attention_mask`` and a ``completion_mask``
    when the trainer's collator makes them)."""
    return {
        "input_ids": tuple(inputs["input_ids"].shape),
        "tokens": int(inputs["attention_mask"].sum())
        if "attention_mask" in inputs
        else inputs["input_ids"].numel(),
        "targets": int(inputs["completion_mask"].sum()) if "completion_mask" in inputs else None,
    }


def _peer_name(name: str, attention: str) -> str:
    import torch
    import transformers
    import trl

    return (
        f"trl {trl.__version__} {name} (transformers {transformers.__version__}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {attention} attention)"
    )


class _Recorder:
    """Step times (``on_step_begin`` to ``on_step_end``), per-step losses, and the shape of the first batch
    the trainer's ``compute_loss`` saw."""

    def __init__(self, describe=None):
        import transformers

        self.times: list[float] = []
        self.losses: list = []
        self.seen: dict | None = None
        self.describe = describe or _describe_rows
        recorder = self

        class StepTimer(transformers.TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                recorder.times.append(time.perf_counter() - self.start)

        self.callback = StepTimer()

    def wrap(self, trainer_cls):
        """``trainer_cls`` recording each step's loss and the first batch's shapes."""
        recorder = self

        class Trainer(trainer_cls):
            def training_step(self, *args, **kwargs):
                loss = super().training_step(*args, **kwargs)  # detached; read after training, off the clock
                recorder.losses.append(loss)
                return loss

            def compute_loss(self, model, inputs, *args, **kwargs):
                if recorder.seen is None:
                    recorder.seen = recorder.describe(inputs)
                return super().compute_loss(model, inputs, *args, **kwargs)

        return Trainer

    def check(self, name: str, repeats: int, rows: int, length: int, targets: int | None = None) -> None:
        if len(self.times) != 1 + repeats:
            raise RuntimeError(f"TRL ran {len(self.times)} optimizer steps, expected {1 + repeats}")
        expected = {"input_ids": (rows, length), "tokens": rows * length}
        if targets is not None:
            expected["targets"] = targets
        seen = {k: (self.seen or {}).get(k) for k in expected}
        if seen != expected:
            raise RuntimeError(f"TRL's {name} saw a batch of {seen}, expected {expected}")

    def result(self, name: str, tokens: int, attention: str) -> dict:
        step = statistics.median(self.times[1:])
        return {
            "peer": _peer_name(name, attention),
            "peer_step_s": step,
            "peer_tokens_per_s": tokens / step,
            "peer_first_loss": float(self.losses[0]),
            "peer_loss": float(self.losses[-1]),
        }


def trl_sft(
    model,
    tokens: np.ndarray,
    *,
    dtype: str = "float32",
    repeats: int = 5,
    param_dtype: str = "float32",
) -> dict:
    """Median step time of TRL's ``SFTTrainer`` on ``tokens`` ([B, T]; one row per example, every token a
    target), dropping the first (warm-up) step.

    ``model`` is one of our models (exported with ``save_hf``) or the path of an HF checkpoint already
    exported from it. Parameters and the optimizer are in ``param_dtype``; ``dtype == "bfloat16"`` turns on
    TRL's bf16 autocast (compute in bfloat16), as ours computes in ``dtype``.
    """
    import datasets
    import torch
    import transformers
    import trl

    batch, seq_len = tokens.shape
    rec = _Recorder()
    # Read in order (sequential sampler): every step sees the same B rows as ours, so the last step's loss is
    # comparable with ours (same weights, same tokens, AdamW with the same hyperparameters).
    rows = [{"input_ids": row.tolist()} for row in np.asarray(tokens)] * (1 + repeats)
    with _quiet(), tempfile.TemporaryDirectory() as tmp:
        checkpoint = _checkpoint(model, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, param_dtype))
        config = trl.SFTConfig(
            **_matched_args(Path(tmp) / "out", batch, 1 + repeats, dtype),
            max_length=seq_len,
            packing=False,
            padding_free=False,
            completion_only_loss=False,
            assistant_only_loss=False,
            dataset_kwargs={"skip_prepare_dataset": True},
        )
        trainer = rec.wrap(trl.SFTTrainer)(
            model=hf,
            args=config,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=_pad_tokenizer(),
            callbacks=[rec.callback],
        )
        trainer.remove_callback(transformers.PrinterCallback)  # disable_tqdm prints the logs instead
        trainer.train()
        attention = hf.config._attn_implementation
    rec.check("SFTTrainer", repeats, batch, seq_len)
    return rec.result("SFTTrainer", batch * seq_len, attention)


def _split_pairs(tokens: np.ndarray, prompt_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[B, 2, P + C]`` pair rows -> (prompts [B, P], chosen completions [B, C], rejected [B, C])."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 3 or tokens.shape[1] != 2:
        raise ValueError(f"pair tokens must be [B, 2, T], got shape {tokens.shape}")
    if not (tokens[:, 0, :prompt_len] == tokens[:, 1, :prompt_len]).all():
        raise ValueError("the two sides of a pair must share their first prompt_len tokens (the prompt)")
    return tokens[:, 0, :prompt_len], tokens[:, 0, prompt_len:], tokens[:, 1, prompt_len:]


def trl_dpo(
    model,
    tokens: np.ndarray,
    prompt_len: int,
    *,
    dtype: str = "float32",
    repeats: int = 5,
    param_dtype: str = "float32",
    beta: float = 0.1,
    reference: str = "live",
) -> dict:
    """Median step time of TRL's ``DPOTrainer`` (sigmoid loss, ``beta``) on the pairs ``tokens`` ([B, 2, T]:
    the prompt is the first ``prompt_len`` tokens of both sides, the completions the rest), dropping the
    first (warm-up) step. The reference model is TRL's own copy of the checkpoint, run in every step
    (``reference="live"``) or once over the data before training (``"precomputed"``). ``model``, ``dtype``
    and ``param_dtype`` as for :func:`trl_sft`.
    """
    import datasets
    import torch
    import transformers
    import trl

    if reference not in ("live", "precomputed"):
        raise ValueError(f"reference={reference!r}: expected 'live' or 'precomputed'")
    batch, _, length = np.shape(tokens)
    prompts, chosen, rejected = _split_pairs(tokens, prompt_len)
    rec = _Recorder()
    rows = [
        {"prompt_ids": p.tolist(), "chosen_ids": c.tolist(), "rejected_ids": r.tolist()}
        for p, c, r in zip(prompts, chosen, rejected, strict=True)
    ] * (1 + repeats)

    class Base(trl.DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids: no EOS added, no re-tokenizing

    with _quiet(), tempfile.TemporaryDirectory() as tmp:
        checkpoint = _checkpoint(model, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, param_dtype))
        config = trl.DPOConfig(
            **_matched_args(Path(tmp) / "out", batch, 1 + repeats, dtype),
            beta=beta,
            loss_type=["sigmoid"],
            label_smoothing=0.0,
            max_length=length,
            truncation_mode="keep_start",
            padding_free=False,
            pad_to_multiple_of=None,
            precompute_ref_log_probs=reference == "precomputed",
            use_weighting=False,
            sync_ref_model=False,
            disable_dropout=True,
        )
        trainer = rec.wrap(Base)(
            model=hf,  # the reference is loaded by the trainer from the same checkpoint (dtype of the policy)
            args=config,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=_pad_tokenizer(),
            callbacks=[rec.callback],
        )
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()
        attention = hf.config._attn_implementation
    rec.check("DPOTrainer", repeats, 2 * batch, length, targets=2 * batch * (length - prompt_len))
    return {
        **rec.result(f"DPOTrainer ({reference} reference)", 2 * batch * length, attention),
        "peer_reference": reference,
    }


def trl_rm(
    model,
    tokens: np.ndarray,
    *,
    dtype: str = "float32",
    repeats: int = 5,
    param_dtype: str = "float32",
) -> dict:
    """Median step time of TRL's ``RewardTrainer`` on the pairs ``tokens`` ([B, 2, T]: chosen and rejected
    sequences, each prompt + completion), dropping the first (warm-up) step. ``model`` is one of our score
    models or the path of its ``*ForSequenceClassification`` export; ``dtype`` and ``param_dtype`` as for
    :func:`trl_sft`.
    """
    import datasets
    import torch
    import transformers
    import trl

    tokens = np.asarray(tokens)
    batch, _, length = tokens.shape
    if (tokens[:, :, -1] == 0).any():
        raise ValueError("a sequence ends in token 0, the peer's pad id: HF would score an earlier token")
    rec = _Recorder()
    rows = [{"chosen_ids": pair[0].tolist(), "rejected_ids": pair[1].tolist()} for pair in tokens] * (
        1 + repeats
    )
    with _quiet(), tempfile.TemporaryDirectory() as tmp:
        checkpoint = _checkpoint(model, tmp)
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(
            checkpoint, dtype=getattr(torch, param_dtype), num_labels=1
        )
        config = trl.RewardConfig(
            **_matched_args(Path(tmp) / "out", batch, 1 + repeats, dtype),
            max_length=length,
            pad_to_multiple_of=None,
            center_rewards_coefficient=None,
            disable_dropout=True,
        )
        trainer = rec.wrap(trl.RewardTrainer)(
            model=hf,
            args=config,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=_pad_tokenizer(),
            callbacks=[rec.callback],
        )
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()
        attention = hf.config._attn_implementation
    rec.check("RewardTrainer", repeats, 2 * batch, length)
    return rec.result("RewardTrainer", 2 * batch * length, attention)


def _id_tokenizer(vocab_size: int):
    """A tokenizer whose vocabulary is the token ids themselves: the text ``"17 4 9"`` is the ids
    ``[17, 4, 9]`` (no special tokens added) and decodes back to it. Id 0 is the pad and the EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{str(i): i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<pad>")


def _random_reward(seed: int = 0):
    """A reward function returning a seeded standard-normal reward per completion. GRPO's advantages are
    the rewards standardized within each group, so a constant reward would make every advantage, and the
    policy gradient with it, zero; random ones keep the update's work real without a reward to compute."""
    rng = np.random.default_rng(seed)

    def random_reward(completions, **kwargs) -> list[float]:
        return rng.standard_normal(len(completions)).tolist()

    return random_reward


def _describe_grpo(inputs: dict) -> dict:
    return {
        "prompt_ids": tuple(inputs["prompt_ids"].shape),
        "completion_ids": tuple(inputs["completion_ids"].shape),
        "targets": int(inputs["completion_mask"].sum()),
    }


def trl_grpo(
    model_dir: str,
    prompts: np.ndarray,
    *,
    group: int,
    new_tokens: int,
    dtype: str = "float32",
    param_dtype: str = "float32",
    repeats: int = 3,
) -> dict:
    """Median iteration time of TRL's ``GRPOTrainer`` on ``prompts`` (int32[P, Lp], ids >= 1), dropping the
    first (warm-up) iteration: sampling ``group`` completions of exactly ``new_tokens`` tokens per prompt
    with the trainer's model (``peer_rollout_s``), then one optimizer step on those ``P * group`` rows
    (``peer_update_s``: the rest of the iteration: rewards, advantages and TRL's bookkeeping, a few ms, and
    the forward, which also computes each token's entropy for TRL's metrics, backward and AdamW update).

    ``model_dir`` is an HF causal-LM checkpoint (``save_hf``); ``dtype`` and ``param_dtype`` as for
    :func:`trl_sft`. Rewards are random (:func:`_random_reward`).
    """
    import datasets
    import torch
    import transformers
    import trl

    prompts = np.asarray(prompts)
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be [P, Lp] token ids, got shape {prompts.shape}")
    n_prompts, prompt_len = prompts.shape
    if prompts.min() < 1:
        raise ValueError("prompt ids must be >= 1: id 0 is the peer's pad and EOS")
    rows = n_prompts * group
    expected_prompts = np.repeat(prompts, group, axis=0).tolist()  # TRL's sampler: each prompt `group` times
    rec = _Recorder(describe=_describe_grpo)
    rollouts: list[tuple[float, bool, list[int]]] = []  # (seconds, prompts as ours, completion lengths)

    class Base(trl.GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            start = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            seconds = time.perf_counter() - start
            rollouts.append((seconds, list(prompt_ids) == expected_prompts, [len(c) for c in completion_ids]))
            return completion_ids, logprobs

    # Read in order (no shuffling): every iteration samples from the same P prompts.
    data = [{"prompt": " ".join(map(str, p))} for p in prompts.tolist()] * (1 + repeats)
    with _quiet(), tempfile.TemporaryDirectory() as tmp:
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, param_dtype))
        config = trl.GRPOConfig(
            # TRL's batch sizes count completions: one generation batch of P * group rows is one optimizer step.
            **_matched_args(Path(tmp) / "out", rows, 1 + repeats, dtype),
            steps_per_generation=1,
            num_generations=group,
            num_iterations=1,
            beta=0.0,
            max_completion_length=new_tokens,
            # EOS (id 0) is banned until new_tokens are out, when max_new_tokens ends every completion.
            generation_kwargs={"min_new_tokens": new_tokens},
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            use_vllm=False,
            shuffle_dataset=False,
            disable_dropout=True,
            mask_truncated_completions=False,
            log_completions=False,
            pad_to_multiple_of=None,
        )
        trainer = rec.wrap(Base)(
            model=hf,
            reward_funcs=_random_reward(),
            args=config,
            train_dataset=datasets.Dataset.from_list(data),
            processing_class=_id_tokenizer(hf.config.vocab_size),
            callbacks=[rec.callback],
        )
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()
        attention, loss_type = hf.config._attn_implementation, config.loss_type
    _check_grpo(rec, rollouts, repeats, rows, prompt_len, new_tokens)
    iteration = statistics.median(rec.times[1:])
    rollout = statistics.median(r[0] for r in rollouts[1:])
    return {
        "peer": _peer_name(f"GRPOTrainer ({loss_type} loss)", attention),
        "peer_loss_type": loss_type,
        "peer_iteration_s": iteration,
        "peer_rollout_s": rollout,
        "peer_update_s": statistics.median(
            t - r[0] for t, r in zip(rec.times[1:], rollouts[1:], strict=True)
        ),
        "peer_rollout_tokens_per_s": rows * new_tokens / rollout,
        "peer_first_loss": float(rec.losses[0]),
        "peer_loss": float(rec.losses[-1]),
    }


def _check_grpo(rec: _Recorder, rollouts: list, repeats: int, rows: int, prompt_len: int, new_tokens: int):
    """TRL ran ``1 + repeats`` optimizer steps, each after one generation from exactly our prompt ids of
    ``rows`` completions of ``new_tokens`` tokens, and its loss saw all of them."""
    if len(rec.times) != 1 + repeats or len(rollouts) != 1 + repeats:
        raise RuntimeError(
            f"TRL ran {len(rec.times)} optimizer steps and {len(rollouts)} generations, expected {1 + repeats}"
        )
    for _, same_prompts, lengths in rollouts:
        if not same_prompts:
            raise RuntimeError("TRL's GRPOTrainer generated from prompt ids other than ours")
        if lengths != [new_tokens] * rows:
            raise RuntimeError(
                f"TRL generated completions of lengths {lengths}, expected {rows} x {new_tokens}"
            )
    expected = {
        "prompt_ids": (rows, prompt_len),
        "completion_ids": (rows, new_tokens),
        "targets": rows * new_tokens,
    }
    if rec.seen != expected:
        raise RuntimeError(f"TRL's GRPOTrainer saw a batch of {rec.seen}, expected {expected}")
