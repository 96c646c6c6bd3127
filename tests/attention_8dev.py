"""Run by test_models_attention.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS must precede jax).

Under a (data 2, fsdp 2, tensor 2) mesh: the vocab-sharded embedding lookup equals the plain one (values
and gradients) and never all-gathers the table; the splash kernel (interpret mode, a fake TPU) runs per
shard and equals the einsum path.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl_llm.models import attention_kernels as kernels
from jaxrl_llm.models import create_model, get_preset
from jaxrl_llm.models.layers import embed_lookup
from jaxrl_llm.parallel import make_mesh

CFG = get_preset("qwen3-tiny", vocab_size=128, num_heads=4, num_kv_heads=2)


def check_embedding(mesh):
    model = create_model(CFG, seed=0, mesh=mesh)
    table = model.embed.embedding.get_value()
    assert tuple(table.sharding.spec) == ("tensor", "fsdp"), table.sharding.spec
    ids = np.random.RandomState(0).randint(0, 128, (8, 16)).astype(np.int32)
    ids[0, :3] = [-1, 128, 500]  # out of range: NaN rows, as without a mesh
    plain = np.asarray(table)
    want = np.where(((ids < 0) | (ids >= 128))[..., None], np.nan, plain[np.clip(ids, 0, 127)])
    cotangent = np.random.RandomState(1).randn(8, 16, CFG.hidden_size).astype(np.float32)
    cotangent[0, :3] = 0
    want_grad = np.zeros_like(plain)
    np.add.at(want_grad, ids[0, 3:], cotangent[0, 3:])
    np.add.at(want_grad, ids[1:].ravel(), cotangent[1:].reshape(-1, CFG.hidden_size))

    def loss(table, tokens):
        x = embed_lookup(table, tokens)
        return jnp.sum(jnp.where(jnp.isnan(x), 0.0, x) * cotangent)

    with jax.set_mesh(mesh):
        tokens = jax.device_put(jnp.asarray(ids), NamedSharding(mesh, P(("data", "fsdp"))))
        lookup = jax.jit(embed_lookup)
        got = lookup(table, tokens)
        hlo = lookup.lower(table, tokens).compile().as_text()
        grad = jax.jit(jax.grad(loss))(table, tokens)
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_allclose(np.asarray(grad), want_grad, atol=1e-5)
    assert grad.sharding.spec == table.sharding.spec, grad.sharding.spec
    # Only ids and masks are gathered; the table's floats never are (a plain gather all-gathers the table).
    gathers = re.findall(r"= (\w+)\[[\d,]*\][^ ]* all-gather\(", hlo)
    assert not [g for g in gathers if g.startswith(("f", "bf"))], gathers
    print("embedding lookup: equal values and gradients, no float all-gather", gathers)


def check_splash(mesh):
    kernels.platform_facts = lambda: ("tpu", 0.0)
    kernels.SPLASH_INTERPRET = True
    calls, real = [], kernels.attend_splash
    kernels.attend_splash = lambda *a, **kw: calls.append(kw["window"]) or real(*a, **kw)
    base = dict(vocab_size=128, num_layers=1, head_dim=128, num_heads=4, num_kv_heads=2)
    reference = create_model(get_preset("qwen3-tiny", attention="xla", **base), seed=0)
    sharded = create_model(get_preset("qwen3-tiny", attention="splash", **base), seed=0, mesh=mesh)
    rs = np.random.RandomState(2)
    tokens = jnp.asarray(rs.randint(1, 128, (4, 128)), jnp.int32)
    segments = jnp.asarray(np.repeat([1, 2, 3, 0], 32)[None].repeat(4, 0), jnp.int32)
    want = np.asarray(reference(tokens, segment_ids=segments))
    graphdef, state = nnx.split(sharded)
    with jax.set_mesh(mesh):
        rows = NamedSharding(mesh, P(("data", "fsdp")))
        run = jax.jit(lambda s, t, seg: nnx.merge(graphdef, s)(t, segment_ids=seg))
        got = np.asarray(run(state, jax.device_put(tokens, rows), jax.device_put(segments, rows)))
    assert calls == [0], calls  # the one layer ran on the kernel
    valid = np.asarray(segments > 0)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4)
    print("splash kernel per shard equals the einsum path")


def main():
    assert jax.device_count() == 8, jax.devices()
    mesh = make_mesh(2, 2, 2)
    check_embedding(mesh)
    check_splash(mesh)
    print("8-device attention checks passed")


if __name__ == "__main__":
    main()
