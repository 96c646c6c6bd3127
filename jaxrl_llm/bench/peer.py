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

The configuration is matched to ours rather than left at TRL's defaults, which differ from transformers'
and from ours: TRL turns gradient checkpointing on and ``bf16`` on unless told otherwise (both off here
for float32; ``bf16`` autocast when the compute dtype is bfloat16), no packing, no padding (all rows have
the same length, and ``pad_to_multiple_of`` is off), no truncation (``max_length`` is the row length),
one micro-batch per step, and AdamW with our default betas, epsilon, weight decay, clip norm and a constant
learning rate. TRL's DPO tokenization (which appends an EOS to each completion) is bypassed so it sees
exactly our token ids. Every peer checks, on the batch its ``compute_loss`` receives, that it processes
the rows and tokens the benchmark counts: ``B`` rows for SFT, and for pairs the ``2B`` sequences prompt +
completion (ours reads a pair as one row ``prompt | chosen | rejected``, the prompt once, but counts the
same ``2B`` sequences). torch, trl, transformers and datasets are imported here only: they are test-only
dependencies.
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


class _Recorder:
    """Step times (``on_step_begin`` to ``on_step_end``), per-step losses, and the shape of the first batch
    the trainer's ``compute_loss`` saw."""

    def __init__(self):
        import transformers

        self.times: list[float] = []
        self.losses: list = []
        self.seen: dict | None = None
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
                    recorder.seen = {
                        "input_ids": tuple(inputs["input_ids"].shape),
                        "tokens": int(inputs["attention_mask"].sum())
                        if "attention_mask" in inputs
                        else inputs["input_ids"].numel(),
                        "targets": int(inputs["completion_mask"].sum())
                        if "completion_mask" in inputs
                        else None,
                    }
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
        import torch
        import transformers
        import trl

        step = statistics.median(self.times[1:])
        return {
            "peer": f"trl {trl.__version__} {name} (transformers {transformers.__version__}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {attention} attention)",
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
