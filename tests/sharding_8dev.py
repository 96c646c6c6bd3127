"""Run by test_parallel.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS must precede jax)."""

from __future__ import annotations

import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxrl_llm.models import create_model, get_preset, load_hf, save_hf
from jaxrl_llm.parallel import logical_to_spec, make_mesh, mesh_from_config, variable_axes

# Shapes chosen so every sharded dimension divides its mesh axes (2 x 2 x 2).
CFG = get_preset("qwen3-tiny", vocab_size=128, num_heads=4, num_kv_heads=2)
EXPECTED = {  # parameter path -> spec the rules table must give it
    ("embed", "embedding"): P("tensor", "fsdp"),
    ("blocks", "attn", "q"): P(None, "fsdp", "tensor", None),
    ("blocks", "attn", "k"): P(None, "fsdp", "tensor", None),
    ("blocks", "attn", "o"): P(None, "tensor", None, "fsdp"),
    ("blocks", "attn", "q_norm", "weight"): P(None, None),
    ("blocks", "mlp", "gate"): P(None, "fsdp", "tensor"),
    ("blocks", "mlp", "down"): P(None, "tensor", "fsdp"),
    ("blocks", "attn_norm", "weight"): P(None, None),
    ("final_norm", "weight"): P(None),
    ("lm_head",): P("fsdp", "tensor"),
}


def flat_params(model):
    return {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def check_param_shardings(model, mesh):
    params = flat_params(model)
    for path, spec in EXPECTED.items():
        array = params[path].get_value()
        assert array.sharding.mesh.shape == mesh.shape, path
        got = tuple(array.sharding.spec) + (None,) * (array.ndim - len(array.sharding.spec))
        assert got == tuple(spec) + (None,) * (array.ndim - len(spec)), (path, array.sharding.spec, spec)
        assert logical_to_spec(variable_axes(params[path])) == spec, path
    q = params[("blocks", "attn", "q")].get_value()
    assert q.addressable_shards[0].data.shape == (CFG.num_layers, 32, 2, 16), q.addressable_shards[
        0
    ].data.shape
    assert len({s.device for s in q.addressable_shards}) == 8


def main():
    assert jax.device_count() == 8, jax.devices()
    mesh = make_mesh(2, 2, 2)
    sharded = create_model(CFG, seed=0, mesh=mesh)
    check_param_shardings(sharded, mesh)

    # The sharded forward equals the single-device forward of the same parameters.
    single = create_model(CFG, seed=0)
    for a, b in zip(flat_params(single).values(), flat_params(sharded).values(), strict=True):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 128, (8, 16)), jnp.int32)
    want = np.asarray(single(tokens))
    graphdef, state = nnx.split(sharded)
    with jax.set_mesh(mesh):
        batch = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, P(("data", "fsdp"))))
        logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, batch)
    assert logits.sharding.spec[0] in (("data", "fsdp"), "data"), logits.sharding.spec
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-5)

    # Loading an HF checkpoint onto the mesh shards as it reads.
    with tempfile.TemporaryDirectory() as path:
        save_hf(single, path)
        loaded = load_hf(path, mesh=mesh)
        check_param_shardings(loaded, mesh)
        np.testing.assert_allclose(np.asarray(loaded(tokens)), want, atol=1e-5)

    # The KV cache is born sharded too: batch over the data axes, KV heads over tensor.
    cache = sharded.init_cache(8, 32, mesh=mesh)
    k, v = cache.k[0], cache.v[0]
    assert tuple(k.sharding.spec) == (("data", "fsdp"), "tensor", None, None), k.sharding.spec
    assert tuple(v.sharding.spec) == (("data", "fsdp"), "tensor", None, None), v.sharding.spec
    assert k.addressable_shards[0].data.shape == (2, 1, 16, 32)
    assert v.addressable_shards[0].data.shape == (2, 1, 32, 16)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).forward(t, cache=c))(state, batch, cache)
    np.testing.assert_allclose(np.asarray(out.logits), want, atol=1e-5)

    # -1 fills the remaining devices; heads that do not divide the tensor axis are replicated, not an error.
    class Parallel:
        data, fsdp, tensor = -1, 2, 2

    assert dict(mesh_from_config(Parallel).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    wide = make_mesh(2, 1, 4)
    k = flat_params(create_model(CFG, mesh=wide))[("blocks", "attn", "k")].get_value()
    assert k.sharding.spec[2] is None, k.sharding.spec  # 2 KV heads cannot split 4 ways
    print("8-device sharding checks passed")


if __name__ == "__main__":
    sys.exit(main())
