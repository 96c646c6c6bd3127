"""Same-run peers for ``bench train``: the same weights, token rows, batch and length through TRL.

``trl_sft`` runs TRL's ``SFTTrainer`` (HF transformers ``Trainer``, PyTorch) for ``1 + repeats`` optimizer
steps on rows that are already tokenized, and times each step from ``on_step_begin`` to ``on_step_end``:
forward, backward, gradient clipping, the AdamW update, the scheduler and ``zero_grad``; collating the next
batch happens before ``on_step_begin`` and is not timed, as our batch is on the device before the step.

The configuration is matched to ours rather than left at TRL's defaults, which differ from transformers'
and from ours: TRL turns gradient checkpointing on and ``bf16`` on unless told otherwise (both off here
for float32; ``bf16`` autocast when the compute dtype is bfloat16), every token is a target (no
completion or assistant mask: the labels are the ``input_ids``), no packing, no padding (all rows have the
same length), one micro-batch per step, and AdamW with our default betas, epsilon, weight decay, clip norm
and a constant learning rate. torch, trl, transformers and datasets are imported here only: they are
test-only dependencies.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def _pad_tokenizer():
    """The smallest tokenizer TRL accepts (it needs one with a pad token): never called on the hot path,
    since the rows are already ``input_ids``."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


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

    from ..config import base_config
    from ..models import save_hf

    batch, seq_len = tokens.shape
    opt = base_config().optimizer
    times: list[float] = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    losses: list = []

    class Trainer(trl.SFTTrainer):
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)  # detached; read after training, off the clock
            losses.append(loss)
            return loss

    # Read in order (sequential sampler): every step sees the same B rows as ours, so the last step's loss is
    # comparable with ours (same weights, same tokens, AdamW with the same hyperparameters).
    rows = [{"input_ids": row.tolist()} for row in np.asarray(tokens)] * (1 + repeats)
    verbosity = transformers.logging.get_verbosity(), datasets.utils.logging.get_verbosity()
    bars = datasets.utils.logging.is_progress_bar_enabled()
    bars_hf = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" in from_pretrained
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(model, str | os.PathLike):
                checkpoint = Path(model)
            else:
                checkpoint = save_hf(model, Path(tmp) / "model")
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                checkpoint, dtype=getattr(torch, param_dtype)
            )
            config = trl.SFTConfig(
                output_dir=str(Path(tmp) / "out"),
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=1,
                max_steps=1 + repeats,
                max_length=seq_len,
                packing=False,
                padding_free=False,
                completion_only_loss=False,
                assistant_only_loss=False,
                dataset_kwargs={"skip_prepare_dataset": True},
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
            trainer = Trainer(
                model=hf,
                args=config,
                train_dataset=datasets.Dataset.from_list(rows),
                processing_class=_pad_tokenizer(),
                callbacks=[StepTimer()],
            )
            trainer.remove_callback(transformers.PrinterCallback)  # disable_tqdm prints the logs instead
            trainer.train()
            attention = hf.config._attn_implementation
    finally:
        transformers.logging.set_verbosity(verbosity[0])
        if bars_hf:
            transformers.utils.logging.enable_progress_bar()
        datasets.utils.logging.set_verbosity(verbosity[1])
        if bars:
            datasets.enable_progress_bars()
    if len(times) != 1 + repeats:
        raise RuntimeError(f"TRL ran {len(times)} optimizer steps, expected {1 + repeats}")
    step = statistics.median(times[1:])
    return {
        "peer": f"trl {trl.__version__} SFTTrainer (transformers {transformers.__version__}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {attention} attention)",
        "peer_step_s": step,
        "peer_tokens_per_s": batch * seq_len / step,
        "peer_loss": float(losses[-1]),
    }
