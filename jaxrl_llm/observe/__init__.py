"""Observability: TensorBoard + JSONL metric writers, the progress bar, MFU."""

from .metrics import MetricWriter, Progress, mfu, peak_flops

__all__ = ["MetricWriter", "Progress", "mfu", "peak_flops"]
