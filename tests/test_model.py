"""Tests for jaxrl_async.model: learner forward, KV-cache decoding, inference numerics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_async.models import transformer as M

CFG = M.ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=32)
ROWS = 3
STEPS = 24
# Episode lengths per row, played back to back in one cache row. Row 1 starts with a
# short episode (so its positions are offset from row 0's) and restarts twice; row 2
# restarts after a long episode, so its second episode must ignore stale slots 6..17.
EPISODES = ((24,), (3, 10, 11), (18, 6))


@pytest.fixture(scope="module")
def model():
    return M.init_model(CFG, seed=0)


@pytest.fixture(scope="module")
def perturbed(model):
    """The model with its matrices perturbed so the logits are far from uniform."""
    _, params = model
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [w + 0.3 * jax.random.normal(k, w.shape) if w.ndim == 2 else w for w, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, leaves)


@pytest.fixture(scope="module")
def schedule():
    """(tokens [STEPS, ROWS], positions [STEPS, ROWS], episodes: list of (row, start step, tokens))."""
    rng = np.random.default_rng(0)
    tokens = np.zeros((STEPS, ROWS), np.int32)
    positions = np.zeros((STEPS, ROWS), np.int32)
    episodes = []
    for row, lengths in enumerate(EPISODES):
        assert sum(lengths) == STEPS
        start = 0
        for n in lengths:
            ep = rng.integers(0, CFG.vocab_size, size=n).astype(np.int32)
            tokens[start : start + n, row] = ep
            positions[start : start + n, row] = np.arange(n)
            episodes.append((row, start, ep))
            start += n
    return tokens, positions, episodes


def _decode(model_, params, numerics, tokens, positions, seed=0):
    """Feeds the schedule one token per row per step; returns logp [STEPS, ROWS, V]."""
    graphdef, _ = model_
    inf = M.inference_params(params, numerics)
    cache = M.init_cache(CFG, tokens.shape[1], numerics)
    keys = jax.random.split(jax.random.key(seed), tokens.shape[0])
    out = []
    for s in range(tokens.shape[0]):
        logp, cache = M.decode_step(
            graphdef, inf, cache, jnp.asarray(tokens[s]), jnp.asarray(positions[s]), numerics, keys[s]
        )
        out.append(logp)
    return np.asarray(jnp.stack(out))


def _reference(model_, params, episodes):
    """Learner log-softmax for every episode, aligned with the decode steps: [STEPS, ROWS, V]."""
    graphdef, _ = model_
    padded = np.zeros((len(episodes), STEPS), np.int32)
    for i, (_, _, ep) in enumerate(episodes):
        padded[i, : len(ep)] = ep
    logp = np.asarray(jax.nn.log_softmax(M.forward_logits(graphdef, params, jnp.asarray(padded)), -1))
    ref = np.zeros((STEPS, ROWS, CFG.vocab_size), np.float32)
    for i, (row, start, ep) in enumerate(episodes):
        ref[start : start + len(ep), row] = logp[i, : len(ep)]
    return ref


@pytest.fixture(scope="module")
def references(model, perturbed, schedule):
    _, params = model
    episodes = schedule[2]
    return {"init": _reference(model, params, episodes), "perturbed": _reference(model, perturbed, episodes)}


# ---------------------------------------------------------------------------
# KV-cache decoding vs the learner forward


@pytest.mark.parametrize("which", ["init", "perturbed"])
def test_fp32_decode_matches_full_forward(model, perturbed, schedule, references, which):
    params = model[1] if which == "init" else perturbed
    tokens, positions, _ = schedule
    got = _decode(model, params, M.Numerics(), tokens, positions)
    np.testing.assert_allclose(got, references[which], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "int8"])
@pytest.mark.parametrize("which", ["init", "perturbed"])
def test_low_precision_mismatch_is_small_but_nonzero(model, perturbed, schedule, references, dtype, which):
    params = model[1] if which == "init" else perturbed
    tokens, positions, _ = schedule
    got = _decode(model, params, M.Numerics(dtype=dtype), tokens, positions)
    assert got.dtype == np.float32
    diff = np.abs(got - references[which])
    assert 1e-6 < diff.mean() < 0.1, diff.mean()
    # Still a normalised distribution.
    np.testing.assert_allclose(jax.nn.logsumexp(got, axis=-1), 0.0, atol=1e-5)


def test_logit_noise_changes_logp_and_is_deterministic_per_key(model, schedule):
    _, params = model
    tokens, positions, _ = schedule
    tokens, positions = tokens[:6], positions[:6]
    clean = _decode(model, params, M.Numerics(), tokens, positions, seed=0)
    noisy = M.Numerics(logit_noise_std=0.5)
    a = _decode(model, params, noisy, tokens, positions, seed=0)
    b = _decode(model, params, noisy, tokens, positions, seed=0)
    c = _decode(model, params, noisy, tokens, positions, seed=1)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - clean).mean() > 0.1
    assert np.abs(a - c).mean() > 0.1
    np.testing.assert_allclose(jax.nn.logsumexp(a, axis=-1), 0.0, atol=1e-5)
    # Noise-free decoding ignores the key.
    np.testing.assert_array_equal(clean, _decode(model, params, M.Numerics(), tokens, positions, seed=1))


def test_inference_params(model):
    _, params = model
    assert M.inference_params(params, M.Numerics()) is params
    for dtype, jdtype in [("bf16", jnp.bfloat16), ("fp16", jnp.float16)]:
        inf = M.inference_params(params, M.Numerics(dtype=dtype))
        assert all(w.dtype == jdtype for w in jax.tree.leaves(inf))
    inf = M.inference_params(params, M.Numerics(dtype="int8"))
    assert jax.tree.structure(inf) == jax.tree.structure(params)
    w, q = np.asarray(params["head"][...]), np.asarray(inf["head"][...])
    assert q.dtype == np.float32 and not np.array_equal(w, q)
    # Per output channel: each column is an integer multiple of its own scale, |level| <= 127.
    scale = np.abs(w).max(axis=0) / 127.0
    levels = q / scale
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert np.abs(np.round(levels)).max() == 127
    np.testing.assert_allclose(q, w, atol=scale.max() / 2 + 1e-7)


def test_decode_rejects_mismatched_numerics(model):
    graphdef, params = model
    cache = M.init_cache(CFG, 2, M.Numerics(dtype="bf16"))
    assert cache["k"].dtype == jnp.bfloat16
    assert cache["k"].shape == (CFG.n_layers, 2, CFG.max_len, CFG.n_heads, CFG.head_dim)
    z = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="inference_params"):
        M.decode_step(graphdef, params, cache, z, z, M.Numerics(dtype="bf16"), jax.random.key(0))


def test_decode_position_out_of_range_is_nan(model):
    graphdef, params = model
    cache = M.init_cache(CFG, 2, M.Numerics())
    tokens = jnp.zeros((2,), jnp.int32)
    positions = jnp.array([CFG.max_len - 1, CFG.max_len], jnp.int32)
    logp, _ = M.decode_step(graphdef, params, cache, tokens, positions, M.Numerics(), jax.random.key(0))
    assert np.all(np.isfinite(logp[0])) and np.all(np.isnan(logp[1]))


# ---------------------------------------------------------------------------
# Learner log-probs


def test_token_logprobs_first_column_causality_and_init(model):
    graphdef, params = model
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, CFG.vocab_size)
    lp = np.asarray(M.token_logprobs(graphdef, params, tokens))
    assert lp.shape == (2, 16) and lp.dtype == np.float32
    np.testing.assert_array_equal(lp[:, 0], 0.0)
    # Consistent with the logits.
    logits = M.forward_logits(graphdef, params, tokens)
    assert logits.shape == (2, 16, CFG.vocab_size) and logits.dtype == jnp.float32
    manual = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(lp[:, 1:], manual, atol=1e-6)
    # Near-uniform initial policy.
    assert np.abs(lp[:, 1:] + np.log(CFG.vocab_size)).max() < 0.5
    # Causal: changing token 10 leaves columns 0..9 unchanged and changes column 10 on.
    changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % CFG.vocab_size)
    lp2 = np.asarray(M.token_logprobs(graphdef, params, changed))
    np.testing.assert_array_equal(lp2[:, :10], lp[:, :10])
    assert np.all(lp2[:, 10] != lp[:, 10])
    assert np.all(np.abs(lp2[:, 11:] - lp[:, 11:]).max(axis=1) > 0)


def test_token_logprobs_gradients_finite_and_nonzero(model):
    graphdef, params = model
    tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, CFG.vocab_size)
    grads = jax.grad(lambda p: M.token_logprobs(graphdef, p, tokens).sum())(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), path
        assert np.abs(g).max() > 0, path


def test_sequence_longer_than_max_len_rejected(model):
    graphdef, params = model
    with pytest.raises(ValueError, match="max_len"):
        M.token_logprobs(graphdef, params, jnp.zeros((1, CFG.max_len + 1), jnp.int32))


# ---------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(vocab_size=0), "vocab_size"),
        (dict(vocab_size=10, d_model=-4), "d_model"),
        (dict(vocab_size=10, n_layers=0), "n_layers"),
        (dict(vocab_size=10, n_heads=0), "n_heads"),
        (dict(vocab_size=10, d_ff=0), "d_ff"),
        (dict(vocab_size=10, max_len=0), "max_len"),
        (dict(vocab_size=10, d_model=30, n_heads=4), "d_model"),
        (dict(vocab_size=10, d_model=12, n_heads=4), "n_heads"),  # odd head dim
    ],
)
def test_model_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        M.ModelConfig(**kwargs)


def test_numerics_validation_names_field_and_values():
    with pytest.raises(ValueError, match="dtype.*fp32.*bf16.*fp16.*int8"):
        M.Numerics(dtype="fp8")
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="logit_noise_std"):
            M.Numerics(logit_noise_std=bad)


# ---------------------------------------------------------------------------
# Sampling


def test_sample_token_logp_and_frequencies():
    probs = np.array([0.5, 0.25, 0.15, 0.1, 0.0], np.float32)
    n = 20000
    logp = jnp.log(jnp.broadcast_to(jnp.asarray(probs), (n, probs.size)))
    tokens, token_logp = M.sample_token(logp, jax.random.key(0))
    tokens, token_logp = np.asarray(tokens), np.asarray(token_logp)
    assert tokens.shape == (n,) and tokens.dtype == np.int32
    np.testing.assert_allclose(token_logp, np.asarray(logp[0])[tokens], atol=1e-6)
    freq = np.bincount(tokens, minlength=probs.size) / n
    np.testing.assert_allclose(freq, probs, atol=0.02)
    assert freq[-1] == 0  # zero-probability token never sampled

    # Tempered sampling: the returned logp is under the distribution actually sampled.
    tokens, token_logp = M.sample_token(logp[:100], jax.random.key(1), temperature=2.0)
    tempered = jax.nn.log_softmax(jnp.log(jnp.asarray(probs)) / 2.0)
    np.testing.assert_allclose(token_logp, np.asarray(tempered)[np.asarray(tokens)], atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        M.sample_token(logp, jax.random.key(0), temperature=0.0)
