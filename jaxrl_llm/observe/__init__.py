"""Observability: TensorBoard + JSONL metrics (W&B too: observe.report_to), progress bar, MFU, run reports."""

from .metrics import MetricWriter, Progress, mfu, peak_flops
from .peak import matmul_flops_per_s, memory_bytes_per_s, mesh_peak_flops
from .report import write_plots, write_report
from .reporting import Reporting

__all__ = [
    "MetricWriter",
    "Progress",
    "Reporting",
    "matmul_flops_per_s",
    "memory_bytes_per_s",
    "mesh_peak_flops",
    "mfu",
    "peak_flops",
    "write_plots",
    "write_report",
]
