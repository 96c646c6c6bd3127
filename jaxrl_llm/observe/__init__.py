"""Observability: TensorBoard + JSONL metric writers, the progress bar, MFU, plots and the HTML run report."""

from .metrics import MetricWriter, Progress, mfu, peak_flops
from .peak import matmul_flops_per_s, memory_bytes_per_s, mesh_peak_flops
from .report import write_plots, write_report

__all__ = [
    "MetricWriter",
    "Progress",
    "matmul_flops_per_s",
    "memory_bytes_per_s",
    "mesh_peak_flops",
    "mfu",
    "peak_flops",
    "write_plots",
    "write_report",
]
