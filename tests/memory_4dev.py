"""Run by test_bench_memory.py in a subprocess with 4 simulated CPU devices: the planner's per-device figures
equal the bytes that really created, sharded arrays hold on one device, on fsdp = 1, 2, 4 and a data x tensor mesh."""

from __future__ import annotations

import math

import jax
from flax import nnx

from jaxrl_llm.bench.memory import MemorySpec, abstract_figures
from jaxrl_llm.models import KVCache, create_model, get_preset
from jaxrl_llm.parallel import make_mesh, place
from jaxrl_llm.train.optimizer import OptimizerConfig, make_optimizer


def on_first_device(tree) -> int:
    """Bytes of ``tree``'s arrays that the mesh's first device holds."""
    first = jax.devices()[0]
    shards = (s for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == first)
    return sum(s.data.nbytes for s in shards)


CFG = get_preset("llama-tiny")
MODEL = create_model(CFG)
PARAMS = nnx.state(MODEL, nnx.Param)
OPT_STATE = jax.jit(make_optimizer(OptimizerConfig(), PARAMS).init)(PARAMS)


def real_bytes(mesh_sizes: tuple[int, int, int]) -> dict[str, int]:
    """What the trainer holds per device: the parameters and AdamW's state placed on the mesh by the rules
    (``place``, as ``run_stage`` places its ``TrainState``) and a 4 x 2-row rollout cache of 16 slots."""
    mesh = make_mesh(*mesh_sizes, devices=jax.devices()[: math.prod(mesh_sizes)])
    return {
        "parameters": on_first_device(place(PARAMS, mesh)),
        "optimizer_state": on_first_device(place(OPT_STATE, mesh)),
        "kv_cache": on_first_device(KVCache.init(CFG, 4 * 2, 16, mesh=mesh)),
    }


seen = []
for sizes in ((1, 1, 1), (1, 2, 1), (1, 4, 1), (2, 1, 2)):
    rl = dict(batch=4, prompt_len=8, new_tokens=8, group=2)
    planned = abstract_figures(MemorySpec("llama-tiny", sizes, stage="dpo"))
    planned["kv_cache"] = abstract_figures(MemorySpec("llama-tiny", sizes, stage="grpo", **rl))["kv_cache"]
    real = real_bytes(sizes)
    for name, value in real.items():
        assert planned[name] == value, (sizes, name, planned[name], value)
    assert planned["reference"] == planned["parameters"]  # dpo's frozen copy keeps each parameter's sharding
    seen.append(real)
for name in ("parameters", "optimizer_state"):  # fsdp 1 -> 2 -> 4
    assert seen[0][name] > seen[1][name] > seen[2][name], name
print("memory planner checks passed")
