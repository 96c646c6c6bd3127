"""Training-step throughput: tokens/s, step time, compile time and the fraction of the matmul peak.

The step is the one training runs (``jaxrl_llm.train.step``: jitted, sharded over every local device,
state donated, compiled ahead of time) with AdamW, on full rows of random tokens where every token is a
target. FLOPs are counted as 3 forwards (forward + backward), the standard 6N-per-token estimate plus
attention; the peak is this machine's matmul FLOP/s measured in the same run (times the device count).

With ``compare_trl`` (objective ``sft``) the same initial weights and token rows then run through TRL's
``SFTTrainer`` (``jaxrl_llm.bench.peer.trl_sft``) at the same batch, length and dtypes, and the ratio of
tokens/s is reported as ``speedup``.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..config import base_config
from .forward import forward_flops
from .peak import matmul_flops_per_s

OBJECTIVES = ("sft",)


def sft_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One document per row, every token a target (what a packed pre-training batch looks like)."""
    rs = np.random.RandomState(seed)
    return {
        "tokens": rs.randint(0, vocab_size, (batch, seq_len)).astype(np.int32),
        "loss_mask": np.ones((batch, seq_len), bool),
        "segment_ids": np.ones((batch, seq_len), np.int32),
        "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1)),
        "num_truncated": np.zeros((batch,), np.int32),
    }


def _train_model(spec: str, param_dtype: str, dtype: str, remat: str = "none"):
    """Mixed precision as training runs it: parameters (and the optimizer) in ``param_dtype``, compute in
    ``dtype``, logits and loss in float32."""
    from pathlib import Path

    from ..models import create_model, get_preset, load_hf

    if Path(spec).is_dir():
        return load_hf(spec, dtype=param_dtype, compute_dtype=dtype, remat=remat)
    return create_model(get_preset(spec, param_dtype=param_dtype, dtype=dtype, remat=remat), seed=0)


def bench_train(
    spec: str,
    *,
    objective: str = "sft",
    batch: int,
    seq_len: int,
    dtype: str = "float32",
    param_dtype: str = "float32",
    accum_steps: int = 1,
    remat: str = "none",
    repeats: int = 5,
    compare_trl: bool = False,
) -> dict:
    from flax import nnx

    from ..data.pipeline import to_device
    from ..models import save_hf
    from ..objectives import sft_objective
    from ..parallel import make_mesh
    from ..train.optimizer import make_optimizer, make_schedule
    from ..train.state import TrainState
    from ..train.step import build_train_step, compile_step, shard_state

    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: expected one of {', '.join(OBJECTIVES)}")
    if compare_trl and objective != "sft":
        raise ValueError(
            f"compare_trl: TRL's SFTTrainer is a peer for objective 'sft' only, not {objective!r}"
        )
    mesh = make_mesh()
    model = _train_model(spec, param_dtype, dtype, remat)
    if compare_trl:  # the step donates the model's arrays: export the peer's copy of the weights first
        peer_dir = tempfile.TemporaryDirectory()
        save_hf(model, peer_dir.name)
    cfg = base_config()
    cfg.optimizer.warmup_steps = 0
    cfg.train.batch_size, cfg.train.grad_accum_steps = batch, accum_steps
    tx = make_optimizer(cfg, nnx.state(model, nnx.Param))
    graphdef, state = TrainState.create(model, tx, jax.random.key(0))
    state = shard_state(state, mesh)
    model_cfg = model.cfg
    del model
    step = build_train_step(graphdef, sft_objective(), tx, make_schedule(cfg), accum_steps=accum_steps)
    host_batch = sft_batch(model_cfg.vocab_size, batch, seq_len)
    device_batch = to_device(host_batch, mesh)
    rng = jax.random.key(1)
    compiled = compile_step(step, state, device_batch, rng, mesh)
    state, metrics = compiled(state, device_batch, rng)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = compiled(state, device_batch, rng)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    devices = jax.devices()
    peak = matmul_flops_per_s(jnp.dtype(dtype)) * len(devices)
    flops = 3 * forward_flops(model_cfg, batch, seq_len)
    result = {
        "objective": objective,
        "model": spec,
        "family": model_cfg.family,
        "batch": batch,
        "seq_len": seq_len,
        "grad_accum_steps": accum_steps,
        "remat": remat,
        "dtype": dtype,
        "param_dtype": param_dtype,
        "device": devices[0].device_kind,
        "devices": len(devices),
        "compile_s": compiled.compile_s,
        "step_s": step_s,
        "tokens_per_s": batch * seq_len / step_s,
        "flops_per_s": flops / step_s,
        "peak_matmul_flops_per_s": peak,
        "peak_fraction": flops / step_s / peak,
        "temp_bytes_per_device": compiled.memory.get("temp_size_in_bytes", 0),
        "loss": float(metrics["loss"]),
    }
    if compare_trl:
        from .peer import trl_sft

        del state, compiled  # our step's buffers are freed before the peer runs
        try:
            peer = trl_sft(
                peer_dir.name, host_batch["tokens"], dtype=dtype, param_dtype=param_dtype, repeats=repeats
            )
        finally:
            peer_dir.cleanup()
        result.update(peer, speedup=result["tokens_per_s"] / peer["peer_tokens_per_s"])
    return result
