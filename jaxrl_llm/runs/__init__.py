"""Browsing and comparing training runs through their artifact registry (``artifacts.json``), and exporting
any checkpoint: ``python -m jaxrl_llm.runs list|show|diff|export`` (see ``__main__``)."""

from .browse import RunError, find_runs, list_lines, load_run, resolve_run, show_lines, status
from .compare import diff_lines, flatten
from .export import export_checkpoint, export_lines, latest_step

__all__ = [
    "RunError",
    "diff_lines",
    "export_checkpoint",
    "export_lines",
    "find_runs",
    "flatten",
    "latest_step",
    "list_lines",
    "load_run",
    "resolve_run",
    "show_lines",
    "status",
]
