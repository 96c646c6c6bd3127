"""Run by test_rollout_sampler.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS must precede jax).

The sampler under a (data 2, fsdp 2, tensor 2) mesh: rows split over data x fsdp, KV heads over tensor,
and the same tokens and log-probs as on one device, greedy and sampled, with groups.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxrl_llm.models import create_model, get_preset
from jaxrl_llm.parallel import make_mesh
from jaxrl_llm.rollout import Sampler, SamplingParams

CFG = get_preset("qwen3-tiny", vocab_size=128, num_heads=4, num_kv_heads=2)


def main():
    assert jax.device_count() == 8, jax.devices()
    mesh = make_mesh(2, 2, 2)
    single = Sampler(create_model(CFG, seed=0), eos_ids=(3,), pad_id=0)
    sharded = Sampler(create_model(CFG, seed=0, mesh=mesh), eos_ids=(3,), pad_id=0, mesh=mesh)
    rs = np.random.RandomState(0)
    ids = rs.randint(4, 128, (8, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding
    ids = np.where(mask == 1, ids, 0)

    cache = sharded.model.init_cache(8, 32, mesh=mesh)
    assert tuple(cache.k[0].sharding.spec)[:2] == (("data", "fsdp"), "tensor"), cache.k[0].sharding.spec

    for sampling, n in ((SamplingParams.greedy(), 1), (SamplingParams(temperature=1.0, top_k=20), 2)):
        kwargs = dict(key=jax.random.key(1), max_new_tokens=10, n=n, sampling=sampling)
        want, got = single.sample(ids, mask, **kwargs), sharded.sample(ids, mask, **kwargs)
        # The completions come back split over the data axes, never gathered onto one device.
        assert got.tokens.sharding.spec[0] == ("data", "fsdp"), got.tokens.sharding.spec
        assert len({s.device for s in got.tokens.addressable_shards}) == 8
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
        np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
        np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)
        np.testing.assert_allclose(np.asarray(got.model_logprobs), np.asarray(want.model_logprobs), atol=1e-5)
    _engine(single.model, sharded.model, mesh, rs)
    print("8-device rollout checks passed")


def _engine(model, sharded_model, mesh, rs):
    """The continuous-batching engine under the mesh: the same tokens as on one device."""
    from jaxrl_llm.rollout.engine import Engine, Request

    def run(engine):
        out = {}
        requests = [
            Request(
                rs_prompt.tolist(),
                6,
                on_event=lambda e, i=i: out.setdefault(i, []).append(e.token),
                sampling=SamplingParams(temperature=1.0) if i % 2 else SamplingParams.greedy(),
                seed=i,
            )
            for i, rs_prompt in enumerate(prompts)
        ]
        engine.generate(requests)
        return out

    prompts = [rs.randint(4, 128, (n,)).astype(np.int32) for n in (5, 9, 3, 12, 7)]
    want = run(Engine(model, slots=8, max_len=32, eos_ids=(3,)))
    sharded = Engine(sharded_model, slots=8, max_len=32, eos_ids=(3,), mesh=mesh)
    assert tuple(sharded.state.cache.k[0].sharding.spec)[:2] == (("data", "fsdp"), "tensor")
    assert run(sharded) == want


if __name__ == "__main__":
    main()
