"""Length buckets of the learner's batch (`learner.length_buckets`): the same update on fewer columns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_async.cluster import batch_from
from jaxrl_async.config import base_config
from jaxrl_async.core.losses import LossConfig, policy_loss
from jaxrl_async.learner import update as learner_lib
from jaxrl_async.models import transformer as model_lib
from jaxrl_async.rollout.trajectory import Trajectory, bucket_length

MAX_LEN = 64
CFG = model_lib.ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=MAX_LEN)


def test_bucket_length_is_the_shortest_bucket_that_fits_and_the_shapes_are_few():
    for n in (1, 3, 4, 7):
        lengths = {bucket_length(k, MAX_LEN, n) for k in range(1, MAX_LEN + 1)}
        assert len(lengths) <= n and max(lengths) == MAX_LEN
        for k in range(1, MAX_LEN + 1):
            t = bucket_length(k, MAX_LEN, n)
            assert k <= t and t - k < -(-MAX_LEN // n)  # fits, wasting less than one bucket step
    assert bucket_length(20, MAX_LEN, 4) == 32 and bucket_length(33, MAX_LEN, 4) == 48
    assert bucket_length(5, MAX_LEN, 0) == MAX_LEN  # off: always the context
    with pytest.raises(ValueError, match="max_len"):
        bucket_length(MAX_LEN + 1, MAX_LEN, 4)


def _trajectories(graphdef, params, b=8, seed=0):
    """`b` episodes of 9..20 tokens, their last tokens generated, behaviour log-probs near the learner's."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(b):
        n = int(rng.integers(9, 21))
        tokens = rng.integers(4, 40, n).astype(np.int32)
        mask = np.arange(n) >= 5
        lp = np.asarray(learner_lib.token_logprobs(graphdef, params, jnp.asarray(tokens[None])))[0]
        behav = np.where(mask, lp + rng.normal(0, 0.1, n), 0).astype(np.float32)
        out.append(Trajectory(tokens=tokens, loss_mask=mask, behav_logp=behav,
                              versions=np.where(mask, 0, -1).astype(np.int32), reward=float(rng.random() < 0.5),
                              success=False, num_turns=1, group_id=i // 4, task_seed=i // 4))
    return out


def test_a_bucketed_batch_gives_the_same_update_as_the_padded_one():
    # Per-sequence weights and means: reductions over each row's tokens, where padding could leak in.
    loss = LossConfig(is_mode="sequence", aggregation="seq_mean_token_mean")
    graphdef, params = model_lib.init_model(CFG, 0)
    trajs = _trajectories(graphdef, params)
    t = bucket_length(max(x.length for x in trajs), MAX_LEN, 4)
    assert t == 32
    batches = {}
    for length in (MAX_LEN, t):
        batch = batch_from(trajs, base_config(), length)
        batches[length] = batch.replace(prox_logp=batch.behav_logp)
        assert batches[length].shape == (8, length)

    def loss_fn(p, mb):
        logp = model_lib.token_logprobs(graphdef, p, mb.tokens)
        return policy_loss(logp, mb.prox_logp, mb.behav_logp, mb.advantages, mb.loss_mask, loss)[0]

    grads = {n: jax.grad(loss_fn)(params, batches[n]) for n in (MAX_LEN, t)}
    for a, b in zip(jax.tree.leaves(grads[MAX_LEN]), jax.tree.leaves(grads[t])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
    # The learner's update (Adam, two epochs of two minibatches): Adam divides each gradient by its
    # running RMS, so float rounding in a near-zero gradient moves a weight by up to ~lr; 1e-3 keeps that < 1e-6.
    optimizer = learner_lib.make_optimizer(1e-3, 1.0)
    update = learner_lib.make_rl_update(graphdef, optimizer, loss, num_minibatches=2, num_epochs=2, donate=False)
    state = learner_lib.create_train_state(params, optimizer)
    out = {}
    for length in (MAX_LEN, t):
        out[length] = update(state, batches[length], jax.random.key(3))
    (full, m_full), (short, m_short) = out[MAX_LEN], out[t]
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(short.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    assert not np.allclose(np.asarray(jax.tree.leaves(full.params)[0]), np.asarray(jax.tree.leaves(params)[0]))
    np.testing.assert_allclose(float(m_full["loss/policy"]), float(m_short["loss/policy"]), atol=1e-6)
