"""Shared test setup."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Keep XLA from grabbing an accelerator's whole memory when the suite runs on one (JAX CUDA).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# One XLA compilation cache for the whole run, shared with the subprocesses the tests start (they inherit the
# environment): the tests build the same tiny models and steps again and again, and compiling dominates them,
# so a program is compiled once and loaded after. A fresh directory each run: timings stay a clean clone's.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxrl_llm_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # most of them take under 1 s

import jax  # noqa: E402

# Reference comparisons are float32-exact: on GPUs, default matmuls would use TF32 and miss 1e-4 parity.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="session")
def _absl_flags_parsed():
    # Grain's multi-worker loader reads absl flags; tests never parse a command line.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    yield


@pytest.fixture(scope="session")
def tiny_sft_run(tmp_path_factory):
    """One finished tiny SFT run (``tests/test_train_loop.py``'s TINY arguments), shared by the modules that
    compare with or copy an uninterrupted run: read it, copy it, never change what it holds."""
    from tests.test_train_loop import train

    run_dir = tmp_path_factory.mktemp("tiny_sft") / "a"
    assert train(run_dir) == 0
    return run_dir
