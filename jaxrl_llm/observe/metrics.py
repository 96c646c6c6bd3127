"""Host-side metric output for the training loop: TensorBoard + JSONL writer, progress bar, MFU.

JSON conventions (``metrics.jsonl``, ``run_info.json``, ``summary.json``): integers stay integers, other
numbers become Python floats, and non-finite floats are written as the strings ``"nan"``, ``"inf"`` and
``"-inf"`` so that every line is valid JSON (``json.loads`` with no special flags reads it back).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .reporting import Reporting, WandbRun

# Keys every JSONL line carries; a metric may not use these names.
RESERVED_KEYS = frozenset({"step", "split", "time"})


def scalar(value: Any) -> int | float:
    """A Python ``int`` (bools and integer dtypes) or ``float`` from a number, numpy or jax scalar."""
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value)
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric value must be a scalar, got shape {array.shape}")
    if array.dtype.kind in "biu":
        return int(array.reshape(()))
    return float(array.reshape(()))


def json_number(value: int | float) -> int | float | str:
    """``value`` unchanged when finite, else ``"nan"``, ``"inf"`` or ``"-inf"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def json_safe(obj: Any) -> Any:
    """``obj`` with numpy/jax scalars and arrays, paths, sets and tuples turned into JSON values.

    Non-finite floats become strings (see the module docstring); unknown objects become ``str(obj)``.
    """
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | float | np.number):
        return json_number(scalar(obj))
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, set | frozenset):
        return sorted((json_safe(v) for v in obj), key=repr)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__array__") and hasattr(obj, "dtype"):  # numpy and jax arrays
        array = np.asarray(obj)
        if array.dtype.kind in "biuf":
            return json_safe(array.tolist() if array.ndim else scalar(array))
    return str(obj)


class MetricWriter:
    """Writes scalar metrics to TensorBoard (``<log_dir>/tensorboard/``) and ``<log_dir>/metrics.jsonl``,
    histograms to TensorBoard, and all of it to a W&B run too when ``report.report_to`` names ``wandb``.

    Each :meth:`write` appends one JSON line ``{"step", "split", "time", **metrics}``; the file is
    appended to, so a resumed run continues it. ``metrics.jsonl`` holds scalars only: a histogram's
    summary statistics are scalar metrics already, and the plots and reports read the file line by line.
    With ``enabled=False`` (JAX processes other than 0) every method is a no-op and no file or directory
    is created.
    """

    def __init__(
        self,
        log_dir: str | Path,
        *,
        enabled: bool = True,
        resume_step: int | None = None,
        report: Reporting | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        """``resume_step``: a run resumed from the checkpoint at this step; what the interrupted run logged
        after it (it is about to be logged again) is dropped from the JSONL file, and TensorBoard is told
        to purge those events. ``report``: the extra loggers (``observe.*``; None = TensorBoard only);
        ``config``: the run's config, given to them (W&B shows it beside the run)."""
        self.log_dir = Path(log_dir)
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        self._wandb: WandbRun | None = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self.log_dir.mkdir(parents=True, exist_ok=True)
        if report is not None and report.wandb:  # first: a failing start leaves no file open
            self._wandb = WandbRun(self.log_dir, report, config)
        purge = None if resume_step is None else int(resume_step) + 1
        for path in (self.jsonl_path, self.log_dir / "samples.jsonl"):
            if purge is not None and path.exists():
                kept = [
                    line
                    for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) < purge
                ]
                path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        self._tb = SummaryWriter(logdir=str(self.log_dir / "tensorboard"), purge_step=purge)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115

    @property
    def jsonl_path(self) -> Path:
        return self.log_dir / "metrics.jsonl"

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "train") -> None:
        """Logs every scalar in ``metrics`` at ``step`` under TensorBoard tag ``f"{prefix}/{name}"``."""
        if not self.enabled or self._tb is None:
            return
        clash = RESERVED_KEYS & set(metrics)
        if clash:
            raise ValueError(f"metric names {sorted(clash)} are reserved for the JSONL line fields")
        step = int(step)
        values = {str(name): scalar(value) for name, value in metrics.items()}
        for name, value in values.items():
            self._tb.add_scalar(f"{prefix}/{name}", value, global_step=step)
        record = {"step": step, "split": prefix, "time": time.time()}
        record.update({name: json_number(value) for name, value in values.items()})
        self._write_line(record)
        if self._wandb is not None:
            self._wandb.log(step, {f"{prefix}/{name}": value for name, value in values.items()})

    def write_histogram(self, step: int, tag: str, values: Any) -> None:
        """Logs the distribution of ``values`` (any shape, flattened; non-finite values left out) to
        TensorBoard under ``tag`` (and W&B); nothing when no value is left. Not written to ``metrics.jsonl``."""
        if not self.enabled or self._tb is None:
            return
        array = np.asarray(values, dtype=np.float64).reshape(-1)
        array = array[np.isfinite(array)]
        if array.size == 0:
            return
        self._tb.add_histogram(tag, array, global_step=int(step))
        if self._wandb is not None:
            self._wandb.histogram(int(step), tag, array)

    def write_text(self, step: int, tag: str, text: str) -> None:
        """Logs ``text`` to TensorBoard under ``tag`` and as a JSONL line with ``split="text"``."""
        if not self.enabled or self._tb is None:
            return
        step = int(step)
        self._tb.add_text(tag, text, global_step=step)
        self._write_line({"step": step, "split": "text", "time": time.time(), "tag": tag, "text": text})
        if self._wandb is not None:
            self._wandb.text(step, tag, text)

    def write_samples(self, step: int, samples: list[dict[str, Any]], path: str | Path | None = None) -> None:
        """Sampled completions at ``step``: one JSON line each in ``path`` (default ``<log_dir>/samples.jsonl``)
        and one TensorBoard text (a Markdown list) under ``samples`` (W&B: a table named after the file)."""
        if not self.enabled or self._tb is None or not samples:
            return
        path = Path(path) if path is not None else self.log_dir / "samples.jsonl"
        with open(path, "a", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps(json_safe({"step": int(step), **sample}), allow_nan=False) + "\n")
        lines = []
        for sample in samples:
            fields = ", ".join(
                f"{k}: {v}" for k, v in sample.items() if k not in ("prompt", "completion", "step")
            )
            lines.append(f"- **{sample.get('prompt', '')}** -> `{sample.get('completion', '')}` ({fields})")
        self._tb.add_text("samples", "\n".join(lines), global_step=int(step))
        if self._wandb is not None:
            self._wandb.table(int(step), path.stem, [json_safe(sample) for sample in samples])

    def _write_line(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()  # metrics are written at intervals; keep the file readable while training

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        """Flushes and closes every output (finishing the W&B run); calling it again does nothing."""
        if self._tb is not None:
            tb, jsonl = self._tb, self._jsonl
            self._tb = self._jsonl = None  # closed once, even when closing fails (a full disk)
            try:
                jsonl.close()
            finally:
                tb.close()
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Progress:
    """A tqdm bar over training steps on stderr, refreshed at most every ``mininterval`` seconds.

    ``mininterval`` defaults to 1 s on a terminal and 5 s otherwise (log files). Disabled: no output.
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, mininterval: float | None = None):
        self._bar = None
        if not enabled:
            return
        if mininterval is None:
            mininterval = 1.0 if sys.stderr.isatty() else 5.0
        self._bar = tqdm(
            total=total,
            initial=initial,
            unit="step",
            file=sys.stderr,
            mininterval=mininterval,
            dynamic_ncols=True,
        )

    def update(
        self, step: int, loss: float | None = None, tokens_per_s: float | None = None, **extra: Any
    ) -> None:
        """Moves the bar to ``step`` and shows ``loss=…, tok/s=…`` and any ``extra`` values."""
        if self._bar is None:
            return
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{scalar(loss):.4g}"
        if tokens_per_s is not None:
            postfix["tok/s"] = f"{scalar(tokens_per_s):,.0f}"
        for name, value in extra.items():
            try:
                postfix[name] = f"{scalar(value):.4g}"
            except (TypeError, ValueError):
                postfix[name] = str(value)
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(int(step) - self._bar.n)  # tqdm rate-limits the redraw (mininterval)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def mfu(flops_per_step: float, step_s: float, peak_flops_per_s: float | None) -> float | None:
    """Model FLOPs utilisation: ``flops_per_step / step_s / peak_flops_per_s``.

    Both FLOP figures must cover the same devices (e.g. the whole step's FLOPs and the per-chip peak times
    the device count). None when the peak is unknown or a time/peak is not positive.
    """
    if peak_flops_per_s is None or peak_flops_per_s <= 0 or step_s <= 0:
        return None
    return float(flops_per_step) / float(step_s) / float(peak_flops_per_s)


# Dense (no sparsity) peak FLOP/s per chip, from the vendors' datasheets.
# GPUs' float32 entry is the TF32 tensor-core peak: JAX's default matmul precision runs float32 matmuls
# in TF32 there (with "highest" precision they run at a fraction of it, and the MFU reads low).
_GPU_PEAKS = {  # name: (bf16/fp16 tensor core, fp32 as TF32 tensor core)
    "h100_pcie": (756e12, 378e12),
    "h100_nvl": (835e12, 418e12),
    "h100_sxm": (989e12, 495e12),  # H200 has the same compute as H100 SXM
    "a100": (312e12, 156e12),
}
_TPU_BF16_PEAKS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}

_DTYPE_ALIASES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "f16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "fp32": "fp32",
    "f32": "fp32",
    "float32": "fp32",
    "float": "fp32",
}


def _chip(device_kind: str) -> str | None:
    kind = device_kind.lower()
    if "h200" in kind:
        return "h100_sxm"
    if "h100" in kind:
        return "h100_pcie" if "pcie" in kind else ("h100_nvl" if "nvl" in kind else "h100_sxm")
    if "a100" in kind:
        return "a100"
    if "tpu" not in kind:
        return None
    # jax device_kind: "TPU v4", "TPU v5 lite" / "TPU v5e" (v5e), "TPU v5" / "TPU v5p" (v5p), "TPU v6 lite".
    if "v6 lite" in kind or "v6e" in kind:
        return "v6e"
    if "v5 lite" in kind or "v5e" in kind or "v5litepod" in kind:
        return "v5e"
    if "v5p" in kind or kind.rstrip().endswith("v5"):
        return "v5p"
    if "v4" in kind and "lite" not in kind:
        return "v4"
    return None


def peak_flops(device_kind: str, dtype: Any) -> float | None:
    """Dense peak matmul FLOP/s of one chip for a jax ``device.device_kind`` and a dtype name.

    ``device_kind`` matches case-insensitively by substring (``"NVIDIA H100 80GB HBM3"``, ``"TPU v5 lite"``).
    GPUs: bf16/fp16 tensor-core peak, fp32 as TF32 (JAX's default). TPUs: bf16 peak; fp32 returns a third of it, since
    XLA on TPU runs fp32 matmuls as multi-pass bf16 (an estimate, not a datasheet figure); fp16 has no
    entry. None for unknown devices (CPUs included: measure with ``jaxrl_llm.bench.peak``) or dtypes.
    """
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or str(dtype)
    precision = _DTYPE_ALIASES.get(str(name).lower())
    chip = _chip(device_kind)
    if precision is None or chip is None:
        return None
    if chip in _GPU_PEAKS:
        half, fp32 = _GPU_PEAKS[chip]
        return fp32 if precision == "fp32" else half
    bf16 = _TPU_BF16_PEAKS[chip]
    return {"bf16": bf16, "fp32": bf16 / 3, "fp16": None}[precision]
