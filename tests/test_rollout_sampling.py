"""jaxrl_llm.rollout.sampling: draw distributions, filters, greedy rows, log-probs, no recompiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.rollout.sampling import SamplingParams, filtered_logits, sample

# 0.999 quantiles of the chi-square distribution by degrees of freedom (scipy.stats.chi2.ppf(0.999, df)).
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def _reference(row: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Filtered log-weights of one row in float64, straight from the definitions (HF order)."""
    t, k, p, m = (float(params.temperature), int(params.top_k), float(params.top_p), float(params.min_p))
    row = row.astype(np.float64)
    if t == 0:
        out = np.full_like(row, -np.inf)
        out[np.argmax(row)] = 0.0
        return out
    z = row / t
    keep = np.ones(z.shape, bool)
    if 0 < k < z.size:
        keep &= z >= np.sort(z)[::-1][k - 1]
    if p < 1:  # keep z_i iff the (top-k renormalised) mass of tokens strictly above it is < top_p
        probs = np.where(keep, np.exp(z - z.max()), 0.0)
        probs /= probs.sum()
        descending = np.sort(z)[::-1]
        mass_above = np.concatenate([[0.0], np.cumsum(probs[np.argsort(-z)])])
        mass_above = mass_above[np.searchsorted(-descending, -z, side="left")]
        assert np.min(np.abs(mass_above - p)) > 1e-5, "test data too close to the top-p boundary"
        keep &= mass_above < p
    if m > 0:
        ratio = np.exp(z - z.max())
        assert np.min(np.abs(ratio[keep] - m)) > 1e-5, "test data too close to the min-p boundary"
        keep &= ratio >= m
    return np.where(keep, z, -np.inf)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    shift = np.max(np.where(finite, x, -np.inf), axis=-1, keepdims=True)
    return x - shift - np.log(np.sum(np.where(finite, np.exp(x - shift), 0.0), axis=-1, keepdims=True))


@jax.jit
def _sample(key, logits, params):
    return sample(key, logits, params)


@jax.jit
def _filtered(logits, params):
    return filtered_logits(logits, params)


def _chi_square(tokens: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    support = probs > 0
    counts = np.bincount(tokens, minlength=probs.size)
    assert np.all(counts[~support] == 0)
    expected = probs[support] * tokens.size
    assert expected.min() >= 5
    return float(np.sum((counts[support] - expected) ** 2 / expected)), int(support.sum()) - 1


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.6),
        SamplingParams(top_k=4, top_p=0.9),
        SamplingParams(temperature=0.8, min_p=0.08),
    ],
    ids=["t1", "t0.7", "t1.6", "topk4-topp0.9", "t0.8-minp"],
)
def test_draws_match_the_filtered_softmax(params):
    logits = np.array([1.0, 0.5, 0.0, -0.5, -1.0, 2.0], np.float32)
    draws = 20_000
    batch = np.broadcast_to(logits, (draws, logits.size))
    tokens, _, _ = _sample(jax.random.key(0), batch, params.as_arrays())
    probs = np.exp(_log_softmax(_reference(logits, params)))
    if params.top_k == 0 and params.top_p == 1 and params.min_p == 0:  # plain temperature: softmax(z / T)
        np.testing.assert_allclose(
            probs, np.exp(_log_softmax(logits.astype(np.float64) / params.temperature)), rtol=1e-12
        )
    statistic, dof = _chi_square(np.asarray(tokens), probs)
    assert statistic < CHI2_999[dof], (statistic, dof)


FILTER_CASES = [
    SamplingParams(top_k=5),
    SamplingParams(top_k=1),
    SamplingParams(top_p=0.7),
    SamplingParams(top_p=0.3),
    SamplingParams(min_p=0.1),
    SamplingParams(top_k=10, top_p=0.8),
    SamplingParams(top_p=0.9, min_p=0.05),
    SamplingParams(top_k=6, min_p=0.2),
    SamplingParams(temperature=0.7, top_k=8, top_p=0.9, min_p=0.1),
    SamplingParams(temperature=1.5, top_k=3),
    SamplingParams(temperature=2.0, top_p=0.5),
]


def _filter_logits(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=2.0, size=(6, 40)).astype(np.float32)


@pytest.mark.parametrize(
    "params", FILTER_CASES, ids=lambda p: f"{p.temperature}-{p.top_k}-{p.top_p}-{p.min_p}"
)
def test_filters_never_emit_excluded_tokens(params):
    logits = _filter_logits(1)
    reference = np.stack([_reference(row, params) for row in logits])
    allowed = np.isfinite(reference)
    assert np.all(allowed.sum(-1) >= 1) and np.any(~allowed)

    filtered = np.asarray(_filtered(logits, params.as_arrays()))
    np.testing.assert_array_equal(np.isfinite(filtered), allowed)
    np.testing.assert_allclose(filtered[allowed], reference[allowed], rtol=1e-6)
    assert np.all(filtered[~allowed] == -np.inf)

    repeats = 2_000
    tokens, _, _ = _sample(jax.random.key(1), np.repeat(logits, repeats, axis=0), params.as_arrays())
    tokens = np.asarray(tokens).reshape(len(logits), repeats)
    assert np.all(np.take_along_axis(allowed, tokens, axis=1))
    # Every allowed token with at least 1% probability shows up.
    probs = np.exp(_log_softmax(reference))
    for row in range(len(logits)):
        likely = np.flatnonzero(probs[row] > 0.01)
        assert set(likely) <= set(tokens[row].tolist())


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=100),
        SamplingParams(top_p=0.5),
        SamplingParams(top_k=300, top_p=0.9),
        SamplingParams(temperature=0.5, top_p=0.8, min_p=0.02),
    ],
    ids=lambda p: f"{p.temperature}-{p.top_k}-{p.top_p}-{p.min_p}",
)
def test_large_vocab_with_ties_and_masked_logits(params):
    rng = np.random.default_rng(8)
    logits = np.round(rng.normal(scale=2.0, size=(4, 4096)) * 4) / 4  # many ties at every threshold
    logits[:, rng.choice(4096, 500, replace=False)] = -np.inf  # tokens masked by the caller stay excluded
    logits = logits.astype(np.float32)
    reference = np.stack([_reference(row, params) for row in logits])
    filtered = np.asarray(_filtered(logits, params.as_arrays()))
    np.testing.assert_array_equal(np.isfinite(filtered), np.isfinite(reference))
    np.testing.assert_allclose(filtered[np.isfinite(filtered)], reference[np.isfinite(reference)], rtol=1e-6)


def test_per_row_params_match_scalar_params():
    logits = _filter_logits(2)
    rows = [
        SamplingParams(),
        SamplingParams(top_k=5),
        SamplingParams(temperature=0.0),
        SamplingParams(top_p=0.7, min_p=0.05),
        SamplingParams(temperature=0.7, top_k=8, top_p=0.9, min_p=0.1),
        SamplingParams(temperature=1.5, min_p=0.2),
    ]
    per_row = SamplingParams(
        temperature=np.array([r.temperature for r in rows], np.float32),
        top_k=np.array([r.top_k for r in rows], np.int32),
        top_p=np.array([r.top_p for r in rows], np.float32),
        min_p=np.array([r.min_p for r in rows], np.float32),
    ).validate()
    filtered = np.asarray(_filtered(logits, per_row.as_arrays()))
    for i, row_params in enumerate(rows):
        reference = _reference(logits[i], row_params)
        np.testing.assert_array_equal(np.isfinite(filtered[i]), np.isfinite(reference))
        np.testing.assert_allclose(filtered[i], reference, rtol=1e-6)


def _kept(logits, params: SamplingParams) -> np.ndarray:
    return np.isfinite(np.asarray(_filtered(logits, params.as_arrays())))


def test_composition_order_follows_hf():
    # top-p acts on the top-k-renormalised distribution: p = [.5, .3, .2], top-k 2 gives [.625, .375], so
    # top_p = 0.6 keeps one token (over the full distribution it would keep two).
    logits = np.log(np.array([[0.5, 0.3, 0.2]], np.float32))
    kept = _kept(logits, SamplingParams(top_k=2, top_p=0.6))
    np.testing.assert_array_equal(kept, [[True, False, False]])
    kept = _kept(logits, SamplingParams(top_p=0.6))
    np.testing.assert_array_equal(kept, [[True, True, False]])
    # Temperature first: p = [.7, .2, .1] keeps one token at top_p = 0.65, but two at temperature 2.
    logits = np.log(np.array([[0.7, 0.2, 0.1]], np.float32))
    kept = _kept(logits, SamplingParams(top_p=0.65))
    np.testing.assert_array_equal(kept, [[True, False, False]])
    kept = _kept(logits, SamplingParams(temperature=2.0, top_p=0.65))
    np.testing.assert_array_equal(kept, [[True, True, False]])


def test_ties_at_the_threshold_are_kept():
    logits = np.array([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]], np.float32)
    kept = _kept(logits, SamplingParams(top_k=2))
    np.testing.assert_array_equal(kept, [[True, True, True, True, False, False]])
    signed_zeros = np.array([[1.0, 0.0, -0.0, -1.0]], np.float32)
    kept = _kept(signed_zeros, SamplingParams(top_k=2))
    np.testing.assert_array_equal(kept, [[True, True, True, False]])
    # The most likely token is always kept, however small top_p is.
    for top_p in (1e-6, 0.0):  # 0 fails validate(), but traced values are not validated
        kept = _kept(logits, SamplingParams(top_p=top_p))
        np.testing.assert_array_equal(kept, [[True, False, False, False, False, False]])


def test_greedy_rows_take_the_argmax_beside_sampling_rows():
    logits = np.random.default_rng(3).normal(scale=0.5, size=(4, 12)).astype(np.float32)
    params = SamplingParams(temperature=np.array([0.0, 1.0, 0.0, 0.5], np.float32)).as_arrays()
    argmax = logits.argmax(-1)
    model = _log_softmax(logits)
    sampled = []
    for seed in range(20):
        tokens, logprobs, model_logprobs = map(np.asarray, _sample(jax.random.key(seed), logits, params))
        np.testing.assert_array_equal(tokens[[0, 2]], argmax[[0, 2]])
        np.testing.assert_array_equal(logprobs[[0, 2]], 0.0)
        np.testing.assert_allclose(model_logprobs, model[np.arange(4), tokens], atol=1e-5)
        sampled.append(tokens[[1, 3]])
    assert len({tuple(s) for s in sampled}) > 1  # the sampling rows do sample

    tokens, logprobs, _ = map(
        np.asarray, _sample(jax.random.key(0), logits, SamplingParams.greedy().as_arrays())
    )
    np.testing.assert_array_equal(tokens, argmax)
    np.testing.assert_array_equal(logprobs, 0.0)
    assert tokens.dtype == np.int32


@pytest.mark.parametrize("params", [SamplingParams(), *FILTER_CASES[::3]], ids=lambda p: str(p))
def test_logprobs_under_the_drawn_and_the_model_distribution(params):
    logits = np.random.default_rng(4).normal(scale=3.0, size=(64, 40)).astype(np.float32)
    tokens, logprobs, model_logprobs = map(np.asarray, _sample(jax.random.key(5), logits, params.as_arrays()))
    filtered = np.asarray(_filtered(logits, params.as_arrays()))
    rows = np.arange(len(logits))
    assert tokens.dtype == np.int32 and logprobs.dtype == np.float32 and model_logprobs.dtype == np.float32
    np.testing.assert_allclose(logprobs, _log_softmax(filtered)[rows, tokens], atol=1e-5)
    np.testing.assert_allclose(model_logprobs, _log_softmax(logits)[rows, tokens], atol=1e-5)
    assert np.all(np.isfinite(logprobs)) and np.all(logprobs <= 0)
    if params.temperature == 1.0:  # truncating the vocabulary only moves mass onto the kept tokens
        assert np.all(logprobs >= model_logprobs - 1e-5)


def test_new_param_values_do_not_recompile():
    traces = []

    @jax.jit
    def step(key, logits, params):
        traces.append(None)
        return sample(key, logits, params)

    logits = np.random.default_rng(6).normal(size=(3, 16)).astype(np.float32)
    settings = [
        SamplingParams(),
        SamplingParams.greedy(),
        SamplingParams(temperature=1, top_k=3),  # a Python int temperature: as_arrays makes it float32
        SamplingParams(temperature=0.5, top_p=0.9, min_p=0.1),
        SamplingParams(top_k=20),
    ]
    for i, params in enumerate(settings):
        jax.block_until_ready(step(jax.random.key(i), logits, params.validate().as_arrays()))
    assert len(traces) == 1

    per_row = [
        SamplingParams(temperature=np.array(t, np.float32), top_k=np.array(k, np.int32))
        for t, k in [([0.0, 1.0, 0.5], [0, 2, 5]), ([1.0, 1.0, 0.0], [1, 0, 0])]
    ]
    for params in per_row:
        jax.block_until_ready(step(jax.random.key(0), logits, params.as_arrays()))
    assert len(traces) == 2  # one more program for [B] leaves, then none


def test_as_arrays_dtypes():
    params = SamplingParams(temperature=1, top_k=3, top_p=1, min_p=0).as_arrays()
    assert params.temperature.dtype == jnp.float32 and params.top_k.dtype == jnp.int32
    assert params.top_p.dtype == jnp.float32 and params.min_p.dtype == jnp.float32
    assert params.temperature.shape == ()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.1}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.0}, "min_p"),
        ({"top_p": np.array([0.9, 1.5])}, "top_p"),
        ({"temperature": np.ones((2, 2))}, "scalar or a \\[B\\] array"),
        ({"temperature": np.ones(2), "top_k": np.zeros(3, np.int32)}, "different lengths"),
    ],
)
def test_validate_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs).validate()


def test_validate_accepts_edges_and_wrong_batch_is_an_error():
    params = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
    assert params.validate() is params
    SamplingParams(temperature=np.array([0.0, 2.0]), top_p=np.array([1e-3, 1.0])).validate()
    with pytest.raises(ValueError, match="scalar or a \\[4\\] array"):
        filtered_logits(np.zeros((4, 5), np.float32), SamplingParams(temperature=np.ones(3)))


@pytest.mark.parametrize(
    "params", FILTER_CASES, ids=lambda p: f"{p.temperature}-{p.top_k}-{p.top_p}-{p.min_p}"
)
def test_kept_tokens_match_hf_warpers(params):
    torch = pytest.importorskip("torch")
    gen = pytest.importorskip("transformers.generation.logits_process")
    # The warpers `generate(do_sample=True)` appends, in its order (transformers/generation/utils.py).
    warpers = gen.LogitsProcessorList(
        [gen.TemperatureLogitsWarper(params.temperature)]
        + ([gen.TopKLogitsWarper(params.top_k)] if params.top_k else [])
        + ([gen.TopPLogitsWarper(params.top_p)] if params.top_p < 1 else [])
        + ([gen.MinPLogitsWarper(params.min_p)] if params.min_p else [])
    )
    logits = _filter_logits(7)
    expected = warpers(None, torch.from_numpy(logits)).numpy()
    filtered = np.asarray(_filtered(logits, params.as_arrays()))
    np.testing.assert_array_equal(np.isfinite(filtered), np.isfinite(expected))
    np.testing.assert_allclose(filtered[np.isfinite(filtered)], expected[np.isfinite(expected)], rtol=1e-6)
