"""Forward (prefill) throughput of a model: tokens/s, compile time and the fraction of the matmul peak.

With ``compare_hf`` the same checkpoint runs through HF transformers (PyTorch) at the same batch, length and
dtype, and the ratio is reported: the project's promise is to be faster than the PyTorch stack on the
same hardware.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models import create_model, get_preset, load_hf, save_hf
from ..models.flops import forward_flops
from .peak import matmul_flops_per_s, timed


def _model(spec: str, dtype: str):
    if Path(spec).is_dir():
        return load_hf(spec, dtype=dtype)
    return create_model(get_preset(spec, param_dtype=dtype, dtype=dtype), seed=0)


def bench_forward(
    spec: str, *, batch: int, seq_len: int, dtype: str = "float32", repeats: int = 5, compare_hf: bool = False
) -> dict:
    model = _model(spec, dtype)
    cfg = model.cfg
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, seq_len)), jnp.int32)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    start = time.perf_counter()
    compiled = forward.lower(state, tokens).compile()
    compile_s = time.perf_counter() - start
    step_s = timed(compiled, state, tokens, repeats=repeats)
    peak = matmul_flops_per_s(jnp.dtype(dtype))
    flops = forward_flops(cfg, batch, seq_len)
    result = {
        "model": spec,
        "family": cfg.family,
        "batch": batch,
        "seq_len": seq_len,
        "dtype": dtype,
        "device": jax.devices()[0].device_kind,
        "compile_s": compile_s,
        "step_s": step_s,
        "tokens_per_s": batch * seq_len / step_s,
        "flops_per_s": flops / step_s,
        "peak_matmul_flops_per_s": peak,
        "peak_fraction": flops / step_s / peak,
    }
    if compare_hf:
        result.update(_bench_hf(model, np.asarray(tokens), dtype, repeats))
        result["speedup"] = result["tokens_per_s"] / result["peer_tokens_per_s"]
    return result


def _bench_hf(model, tokens: np.ndarray, dtype: str, repeats: int) -> dict:
    """The same weights through transformers' ``AutoModelForCausalLM`` forward (PyTorch, eval, no grad)."""
    import statistics

    import torch
    import transformers

    with tempfile.TemporaryDirectory() as path:
        save_hf(model, path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor(tokens, dtype=torch.long)
    times = []
    with torch.no_grad():
        hf(input_ids=ids)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            hf(input_ids=ids)
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {
        "peer": f"transformers {transformers.__version__} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)",
        "peer_step_s": step,
        "peer_tokens_per_s": tokens.size / step,
    }
