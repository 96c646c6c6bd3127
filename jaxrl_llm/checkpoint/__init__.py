"""Checkpoints and run artifacts: Orbax checkpoints that resume exactly, the run directory's records."""

from .manager import CheckpointDamagedError, Checkpointer, CheckpointMismatchError
from .registry import ARTIFACTS_NAME, collect_artifacts, read_artifacts, write_artifacts
from .run_info import params_digest, write_run_info, write_summary

__all__ = [
    "ARTIFACTS_NAME",
    "CheckpointDamagedError",
    "CheckpointMismatchError",
    "Checkpointer",
    "collect_artifacts",
    "params_digest",
    "read_artifacts",
    "write_artifacts",
    "write_run_info",
    "write_summary",
]
