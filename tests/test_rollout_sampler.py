"""The sampler: greedy equals the full forward's argmax and HF's greedy generate, log-probs equal a full
forward's, stops end rows, groups share a prefill, rows are independent, and a bucket compiles once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import create_model, get_preset
from jaxrl_llm.rollout.generate import generate
from jaxrl_llm.rollout.sampler import FINISH_REASONS, Sampler, compiled_generate, prompt_bucket
from jaxrl_llm.rollout.sampling import SamplingParams
from tests.simulated_devices import ROOT, run_on_cpu_devices

ARCH = get_preset("llama-tiny", vocab_size=64)


@pytest.fixture(scope="module")
def model():
    return create_model(ARCH, seed=0)


def prompts(seed=0, batch=4, length=10):
    rs = np.random.RandomState(seed)
    ids = rs.randint(1, ARCH.vocab_size, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[1, :4] = 0  # left padding
    if batch > 2:
        mask[2, 7:] = 0  # right padding
    return np.where(mask == 1, ids, 0), mask


def full_logprobs(model, prompt_ids, prompt_mask, rollout):
    """log p(token_t | prefix) for every generated token, from one uncached forward of prompt + completion."""
    out = []
    for r in range(prompt_ids.shape[0]):
        prompt = prompt_ids[r][prompt_mask[r] == 1]
        gen = np.asarray(rollout.tokens[r])[np.asarray(rollout.completion_mask[r])]
        seq = np.concatenate([prompt, gen])[None]
        logits = np.asarray(model(jnp.asarray(seq)))[0]
        logp = jax.nn.log_softmax(logits, axis=-1)
        out.append([float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(gen)])
    return out


@pytest.mark.slow
def test_greedy_is_the_full_forwards_argmax(model):
    ids, mask = prompts()
    rollout = Sampler(model).sample(
        ids, mask, key=jax.random.key(0), max_new_tokens=8, sampling=SamplingParams.greedy()
    )
    for r in range(ids.shape[0]):
        prompt = ids[r][mask[r] == 1]
        gen = np.asarray(rollout.tokens[r])
        seq = np.concatenate([prompt, gen])[None]
        logits = np.asarray(model(jnp.asarray(seq)))[0]
        np.testing.assert_array_equal(logits[len(prompt) - 1 : -1].argmax(-1), gen)
    assert (np.asarray(rollout.lengths) == 8).all()
    assert all(FINISH_REASONS[int(x)] == "length" for x in rollout.finish_reason)


def test_logprobs_equal_a_full_forward(model):
    ids, mask = prompts(1)
    rollout = Sampler(model).sample(
        ids, mask, key=jax.random.key(3), max_new_tokens=6, sampling=SamplingParams(temperature=1.0)
    )
    want = full_logprobs(model, ids, mask, rollout)
    for r, row in enumerate(want):
        got = np.asarray(rollout.model_logprobs[r])[: len(row)]
        np.testing.assert_allclose(got, row, atol=1e-5)
        # temperature 1, no truncation: the sampling distribution is the model's
        np.testing.assert_allclose(np.asarray(rollout.logprobs[r])[: len(row)], row, atol=1e-5)


def test_eos_and_stop_sequences_end_rows(model):
    ids, mask = prompts(2)
    greedy = SamplingParams.greedy()
    free = Sampler(model).sample(ids, mask, key=jax.random.key(0), max_new_tokens=8, sampling=greedy)
    tokens = np.asarray(free.tokens)
    eos = int(tokens[0, 2])  # row 0's third token becomes an EOS id
    stop = tuple(int(t) for t in tokens[1, 3:5])  # row 1's 4th-5th tokens become a stop sequence
    out = Sampler(model, eos_ids=(eos,), pad_id=63).sample(
        ids, mask, key=jax.random.key(0), max_new_tokens=8, sampling=greedy, stop_sequences=[stop]
    )
    lengths = np.asarray(out.lengths)
    first_eos = int(np.argmax(tokens[0] == eos))
    assert lengths[0] == first_eos + 1 and FINISH_REASONS[int(out.finish_reason[0])] == "eos"
    row1 = tokens[1]
    ends = [t + 2 for t in range(7) if tuple(row1[t : t + 2]) == stop] + [
        int(np.argmax(row1 == eos)) + 1 if (row1 == eos).any() else 99
    ]
    assert lengths[1] == min(ends)
    np.testing.assert_array_equal(np.asarray(out.tokens[0, lengths[0] :]), 63)
    assert not np.asarray(out.completion_mask[0, lengths[0] :]).any()


def test_groups_share_the_prefill_and_differ_by_key(model):
    ids, mask = prompts(3, batch=2)
    out = Sampler(model).sample(ids, mask, key=jax.random.key(5), max_new_tokens=6, n=3)
    assert out.tokens.shape == (6, 6)
    rows = np.asarray(out.tokens)
    assert len({tuple(r) for r in rows[:3]}) > 1  # three different samples of prompt 0
    # Greedy samples of one prompt are identical.
    g = Sampler(model).sample(
        ids, mask, key=jax.random.key(5), max_new_tokens=6, n=3, sampling=SamplingParams.greedy()
    )
    gt = np.asarray(g.tokens)
    assert (gt[0] == gt[1]).all() and (gt[1] == gt[2]).all() and (gt[3] == gt[5]).all()


def test_a_rows_output_does_not_depend_on_the_other_rows(model):
    ids, mask = prompts(4)
    key = jax.random.key(9)
    together = Sampler(model).sample(ids, mask, key=key, max_new_tokens=6)
    other_ids, other_mask = prompts(5)
    other_ids[0], other_mask[0] = ids[0], mask[0]  # row 0 the same, the others different lengths/content
    other_mask[1:, :3] = 0
    apart = Sampler(model).sample(other_ids, other_mask, key=key, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(together.tokens[0]), np.asarray(apart.tokens[0]))


def test_one_compile_per_bucket(model):
    sampler = Sampler(model)
    before = compiled_generate._cache_size()
    for length in (9, 12, 16):  # all in bucket 16
        ids, mask = prompts(6, length=length)
        sampler.sample(
            ids,
            mask,
            key=jax.random.key(length),
            max_new_tokens=4,
            sampling=SamplingParams(temperature=0.7, top_k=5),
        )
        sampler.sample(ids, mask, key=jax.random.key(0), max_new_tokens=4, sampling=SamplingParams(top_p=0.9))
    assert compiled_generate._cache_size() - before == 1
    assert prompt_bucket(16) == 16 and prompt_bucket(17) == 32


def test_a_longer_cache_gives_the_same_rollout(model):
    """``cache_len``: a cache sized for a longer request (its extra slots never written, masked out) draws
    the same tokens with the same log-probs; one shorter than the slots the generation writes is refused."""
    ids, mask = prompts(1)  # 10 tokens, left-padded to their bucket of 16: the generation writes 16 + 6 slots
    sampler = Sampler(model)

    def sample(**kw):  # the default is test_logprobs_equal_a_full_forward's program: one compile in all
        sampling = SamplingParams(temperature=1.0)
        return sampler.sample(ids, mask, key=jax.random.key(3), max_new_tokens=6, sampling=sampling, **kw)

    default = sample()
    longer = sample(cache_len=300)  # more than two 128-slot blocks: the blocked decode
    np.testing.assert_array_equal(np.asarray(longer.tokens), np.asarray(default.tokens))
    np.testing.assert_array_equal(np.asarray(longer.completion_mask), np.asarray(default.completion_mask))
    for field in ("logprobs", "model_logprobs"):
        np.testing.assert_allclose(getattr(longer, field), getattr(default, field), atol=1e-5, err_msg=field)
    before = compiled_generate._cache_size()
    sample(cache_len=16 + 6)  # exactly the default's cache: its program, not another
    assert compiled_generate._cache_size() == before

    with pytest.raises(ValueError, match="cache_len 21 is smaller than the 22 slots the generation writes"):
        sample(cache_len=21)  # 10 + 6 would fit, but the prompts are left-padded to 16
    with pytest.raises(ValueError, match="cache_len 9999 exceeds the model's max_seq_len 512"):
        sample(cache_len=9999)
    graphdef, state = nnx.split(model)
    with pytest.raises(
        ValueError, match="cache_len 15 is smaller than the prompt width 10 \\+ max_new_tokens 6"
    ):  # generate itself, as an RL step calls it inside its own program
        generate(
            graphdef, state, ids, mask, jax.random.key(0), SamplingParams(), max_new_tokens=6, cache_len=15
        )


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_equals_hf_generate(tmp_path, family):
    from jaxrl_llm.models import load_hf
    from tests.hf_reference import make_hf_model, torch

    hf, path = make_hf_model(family, tmp_path / family)
    ours = load_hf(path)
    rs = np.random.RandomState(0)
    ids = rs.randint(1, ours.cfg.vocab_size, (3, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding, as HF generate expects for decoder-only models
    mask[2, :5] = 0
    ids = np.where(mask == 1, ids, 0)
    new = 10
    with torch.no_grad():
        want = hf.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )[:, ids.shape[1] :].numpy()
    got = Sampler(ours).sample(
        ids, mask, key=jax.random.key(0), max_new_tokens=new, sampling=SamplingParams.greedy()
    )
    np.testing.assert_array_equal(np.asarray(got.tokens), want)


@pytest.mark.slow
def test_sharded_under_a_mesh_equals_one_device():
    """Rows over data x fsdp, KV heads over tensor: the same completions as one device (8 simulated CPUs)."""
    run_on_cpu_devices([str(ROOT / "tests" / "rollout_8dev.py")], 8, "8-device rollout checks passed")


def test_the_last_bucket_ends_at_the_context_limit():
    """A 40-token prompt (bucket 64) with 8 new tokens fits a 64-token model: the bucket is capped at 56."""
    small = create_model(get_preset("llama-tiny", vocab_size=64, max_seq_len=64), seed=0)
    ids = np.random.RandomState(0).randint(1, 64, (2, 40)).astype(np.int32)
    rollout = Sampler(small).sample(ids, np.ones_like(ids), key=jax.random.key(0), max_new_tokens=8)
    assert rollout.tokens.shape == (2, 8)
    with pytest.raises(
        ValueError, match="prompts of 60 tokens \\+ max_new_tokens 8 exceed the model's max_seq_len 64"
    ):
        Sampler(small).sample(
            ids[:, :1].repeat(60, 1), np.ones((2, 60)), key=jax.random.key(0), max_new_tokens=8
        )
