"""Generation throughput of the in-graph sampler: decode and end-to-end tokens/s, compile time, and the
fraction of this machine's limit, with HF transformers' ``generate`` on the same checkpoint as the peer.

The limit is what the measured matmul FLOP/s and memory read bandwidth allow: the prefill's FLOPs at the
matmul peak, then per decode step the larger of its FLOPs at the matmul peak and its reads (every weight
matrix once, plus the keys and values cached so far) at the read bandwidth.

``max_len`` sets the KV cache's slot count, the sampler's ``cache_len`` (by default what the sampler
allocates: the prompt's bucket + the new tokens). A longer cache, of which only the first prompt + new-token
slots are ever written, is a server's or an RL rollout's cache sized for its longest request: decode reads
only the filled blocks of it.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import UserError
from .forward import _model, forward_flops
from .peak import matmul_flops_per_s, memory_bytes_per_s


def _timed_call(fn, repeats: int) -> tuple[float, float]:
    """(first call incl. compile, median of ``repeats`` later calls), in seconds."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def decode_step_floor(
    cfg, batch: int, cached: int, itemsize: int, flops_per_s: float, bytes_per_s: float
) -> float:
    """Seconds one decode step needs at best: its matmul FLOPs at the peak, or reading every weight matrix
    (not the embedding table, of which it gathers ``batch`` rows) and ``cached`` slots of keys and values."""
    e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    matrices = (
        cfg.num_layers * (e * d * (2 * h + 2 * kv) + 3 * e * cfg.intermediate_size) + e * cfg.vocab_size
    )
    flops = batch * (2 * matrices + 4 * cfg.num_layers * h * d * cached)
    reads = (matrices + batch * cached * cfg.num_layers * 2 * kv * d) * itemsize
    return max(flops / flops_per_s, reads / bytes_per_s)


def cache_slots(prompt_len: int, new_tokens: int, max_seq_len: int, max_len: int | None = None) -> int:
    """The KV cache's slot count for prompts of ``prompt_len`` and ``new_tokens`` more: ``max_len``, or by
    default what the sampler allocates (the prompt's power-of-two bucket, capped at the context, + the new
    tokens). ``UserError`` for a generation past the model's context or a cache too short for it: the
    sampler's own checks, worded for the command line and made before the model is built."""
    from ..rollout.sampler import padded_width

    if prompt_len + new_tokens > max_seq_len:
        raise UserError(
            f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceed the model's max_seq_len {max_seq_len}"
        )
    bucket = padded_width(prompt_len, new_tokens, max_seq_len)  # as the sampler pads the prompts
    if max_len is None:
        return bucket + new_tokens
    if max_len < bucket + new_tokens:
        raise UserError(
            f"--max-len {max_len} is smaller than --prompt-len {prompt_len} + --new-tokens {new_tokens}"
            + (f" (the prompts left-padded to their bucket of {bucket})" if bucket > prompt_len else "")
            + f": the generation writes {bucket + new_tokens} cache slots"
        )
    if max_len > max_seq_len:
        raise UserError(f"--max-len {max_len} exceeds the model's max_seq_len {max_seq_len}")
    return max_len


def bench_rollout(
    spec: str,
    *,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    max_len: int | None = None,
    dtype: str = "float32",
    sample: bool = False,
    compare_hf: bool = False,
    repeats: int = 3,
) -> dict:
    from ..models import count_params
    from ..rollout.sampler import Sampler
    from ..rollout.sampling import SamplingParams

    model = _model(spec, dtype)
    cfg = model.cfg
    slots = cache_slots(prompt_len, new_tokens, cfg.max_seq_len, max_len)
    rs = np.random.RandomState(0)
    ids = rs.randint(1, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    mask = np.ones_like(ids)
    params = SamplingParams(temperature=1.0) if sample else SamplingParams.greedy()
    sampler = Sampler(model, eos_ids=(), pad_id=0)  # no EOS: every row makes exactly new_tokens tokens

    def run(n_new):
        # --max-len's cache for both runs; without it, each run's own (the prompts' bucket + its new tokens).
        return lambda: (
            sampler.sample(
                ids, mask, key=jax.random.key(0), max_new_tokens=n_new, sampling=params, cache_len=max_len
            ).tokens
        )

    first, total_s = _timed_call(run(new_tokens), repeats)
    _, prefill_s = _timed_call(run(1), repeats)  # prefill + the first token
    decode_s = max(total_s - prefill_s, 1e-9)

    flops_peak = matmul_flops_per_s(jnp.dtype(dtype))
    bandwidth = memory_bytes_per_s()
    n_params = count_params(model)
    limit_s = forward_flops(cfg, batch, prompt_len) / flops_peak + sum(
        decode_step_floor(cfg, batch, prompt_len + i, jnp.dtype(dtype).itemsize, flops_peak, bandwidth)
        for i in range(1, new_tokens)
    )
    result = {
        "model": spec,
        "family": cfg.family,
        "parameters": n_params,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "max_len": slots,
        "dtype": dtype,
        "sampling": "temperature 1" if sample else "greedy",
        "device": jax.devices()[0].device_kind,
        "compile_s": max(first - total_s, 0.0),
        "total_s": total_s,
        "tokens_per_s": batch * new_tokens / total_s,
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s,
        "peak_matmul_flops_per_s": flops_peak,
        "memory_bytes_per_s": bandwidth,
        "limit_tokens_per_s": batch * new_tokens / limit_s,
        "peak_fraction": limit_s / total_s,
    }
    if compare_hf:
        result.update(_hf_generate(model, ids, mask, new_tokens, dtype, sample, repeats))
        result["speedup"] = result["tokens_per_s"] / result["peer_tokens_per_s"]
    return result


def _hf_generate(model, ids, mask, new_tokens: int, dtype: str, sample: bool, repeats: int) -> dict:
    """The same checkpoint through transformers' ``generate`` (PyTorch), exactly ``new_tokens`` per row."""
    import torch
    import transformers

    from ..models import save_hf

    with tempfile.TemporaryDirectory() as path:
        save_hf(model, path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    # The peer runs where we run: on the GPU when JAX is on one (and torch sees it), else on the CPU.
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    hf = hf.to(device)
    inputs = {
        "input_ids": torch.tensor(ids, dtype=torch.long, device=device),
        "attention_mask": torch.tensor(mask, device=device),
    }
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=sample, pad_token_id=0)
    if sample:
        kwargs.update(temperature=1.0, top_k=0, top_p=1.0)

    def run():
        with torch.no_grad():
            out = hf.generate(**inputs, **kwargs, eos_token_id=None)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    assert out.shape[1] == ids.shape[1] + new_tokens
    step = statistics.median(times)
    return {
        "peer": f"transformers {transformers.__version__} generate (torch {torch.__version__}, "
        + (torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} threads")
        + ")",
        "peer_total_s": step,
        "peer_tokens_per_s": ids.shape[0] * new_tokens / step,
    }
