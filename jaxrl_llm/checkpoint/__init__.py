"""Checkpoints and run artifacts: Orbax checkpoints that resume exactly, the run directory's records."""

from .manager import CheckpointDamagedError, Checkpointer, CheckpointMismatchError
from .run_info import params_digest, write_run_info, write_summary

__all__ = [
    "CheckpointDamagedError",
    "CheckpointMismatchError",
    "Checkpointer",
    "params_digest",
    "write_run_info",
    "write_summary",
]
