"""A LoRA model beyond the process: its adapters as a PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``) that HF ``peft.PeftModel.from_pretrained(base, DIR)`` loads onto the base
checkpoint, and a fingerprint of its base (``base_fingerprint``), which a run records so that adapters are
never put back on another base.

PEFT stores, per layer and projection, ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``
``[r, in]`` and ``...lora_B.weight`` ``[out, r]`` (``torch.nn.Linear`` layout); ours are ``lora_a [L, *in, r]``
and ``lora_b [L, r, *out]``, flattened the way ``hf_io`` flattens the weights they adapt.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from ..parallel import barrier, is_main_process, to_host
from .lora import ADAPTER_STATE, PROJECTIONS, adapters, config_of

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """``{PEFT tensor name: float32 array}`` for every adapter of a causal LM (layer by layer)."""
    tensors = {}
    for path, adapter in adapters(model):
        kind, name = path.split("/")[-2:]
        n_in, hf_name = PROJECTIONS[kind, name]
        a, b = to_host(adapter.lora_a.get_value()), to_host(adapter.lora_b.get_value())
        for i, (a_i, b_i) in enumerate(zip(a, b, strict=True)):
            fan_in, rank = math.prod(a_i.shape[:n_in]), a_i.shape[-1]
            prefix = f"base_model.model.model.layers.{i}.{hf_name}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a_i.reshape(fan_in, rank).T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b_i.reshape(rank, -1).T)
    return {k: v.astype(np.float32) for k, v in tensors.items()}


def save_peft(model: nnx.Module, path: str | os.PathLike, *, base_model: str | None = None) -> Path:
    """Writes ``model``'s adapters (a causal LM's) as a PEFT LoRA adapter directory; ``base_model`` (the HF
    checkpoint it adapts) becomes ``base_model_name_or_path``. Every process calls it; process 0 writes."""
    cfg = config_of(model)
    if cfg is None:
        raise ValueError("the model has no LoRA adapters to save")
    if not hasattr(model, "logits"):
        raise ValueError("a PEFT adapter is written for causal LMs only; export the merged model instead")
    found = adapters(model)
    modules = sorted({PROJECTIONS[tuple(p.split("/")[-2:])][1].rsplit(".", 1)[-1] for p, _ in found})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": cfg.rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    tensors = peft_tensors(model)
    path = Path(path)
    if is_main_process():
        path.mkdir(parents=True, exist_ok=True)
        (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    barrier(f"save_peft {path}")
    return path


def base_fingerprint(model: nnx.Module) -> dict[str, tuple[float, float]]:
    """``{path: (L2 norm, sum against a fixed +-1 pattern)}`` of every base weight (float32, on device): a
    record that tells whether adapters are put back on the base they were trained on, without hashing
    every byte. A changed weight moves its signed sum by about its change's norm."""
    flat = [("/".join(map(str, p)), v.get_value()) for p, v in nnx.to_flat_state(_base_state(model))]
    stats = to_host(jax.jit(lambda xs: [_signature(x) for x in xs])([x for _, x in flat]))
    return {path: (float(s[0]), float(s[1])) for (path, _), s in zip(flat, stats, strict=True)}


def _base_state(model: nnx.Module) -> nnx.State:
    return nnx.state(model, nnx.All(nnx.Param, nnx.Not(ADAPTER_STATE)))


def _signature(x: jax.Array) -> jax.Array:
    index = jnp.zeros(x.shape, jnp.uint32)  # the row-major element index, mod 2**32, without a reshape
    stride = 1
    for axis in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= x.shape[axis]
    sign = 1.0 - 2.0 * (((index * jnp.uint32(2654435761)) >> 16) & 1).astype(jnp.float32)
    x = x.astype(jnp.float32)
    return jnp.stack([jnp.sqrt(jnp.sum(x * x)), jnp.sum(x * sign)])


def fingerprint_differences(saved: dict, now: dict, rtol: float = 1e-4) -> list[str]:
    """The base weights whose record differs (beyond float32 reduction noise, relative to the norm)."""
    out = [p for p in now if p not in saved] + [p for p in saved if p not in now]
    for path in now:
        if path in saved:
            (n0, s0), (n1, s1) = saved[path], now[path]
            scale = rtol * max(n0, n1, 1e-30)
            if abs(n0 - n1) > scale or abs(s0 - s1) > scale:
                out.append(path)
    return out
