"""The learner's non-finite guard: a batch or weights that give a NaN/inf loss or gradient skip the update."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_async.cluster import RLCluster
from jaxrl_async.core.losses import LossConfig
from jaxrl_async.learner import update as learner_lib
from jaxrl_async.models import transformer as model_lib
from jaxrl_async.rollout.trajectory import Batch

CFG = model_lib.ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=16)
B, T = 4, 16


@pytest.fixture(scope="module")
def setup():
    graphdef, params = model_lib.init_model(CFG, 0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 40, (B, T)).astype(np.int32)
    mask = np.zeros((B, T), bool)
    mask[:, 3:12] = True
    lp = np.asarray(learner_lib.token_logprobs(graphdef, params, jnp.asarray(tokens)))
    behav = np.where(mask, lp + rng.normal(0, 0.1, (B, T)), 0).astype(np.float32)
    batch = Batch(tokens=tokens, loss_mask=mask, behav_logp=behav, versions=np.where(mask, 0, -1).astype(np.int32),
                  advantages=np.where(mask, rng.normal(0, 1, (B, 1)), 0).astype(np.float32), prox_logp=behav)
    optimizer = learner_lib.make_optimizer(1e-2, 1.0)
    update = learner_lib.make_rl_update(graphdef, optimizer, LossConfig(), num_minibatches=2, donate=False)
    return graphdef, params, batch, optimizer, update


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_skipped(state, new, metrics):
    assert float(metrics["train/skipped_nonfinite"]) == 1.0
    for a, b in zip(_leaves((state.params, state.opt_state, state.ewma)), _leaves((new.params, new.opt_state,
                                                                                  new.ewma))):
        np.testing.assert_array_equal(a, b)
    assert int(new.step) == int(state.step) and int(new.version) == int(state.version) + 1


def test_clean_batch_updates(setup):
    _, params, batch, optimizer, update = setup
    state = learner_lib.create_train_state(params, optimizer, ewma=True)
    new, metrics = update(state, batch, jax.random.key(0), 0.9)
    assert float(metrics["train/skipped_nonfinite"]) == 0.0
    assert int(new.step) == 2 and int(new.version) == 1
    assert any((a != b).any() for a, b in zip(_leaves(state.params), _leaves(new.params)))


def test_nan_behaviour_logp_skips_the_update(setup):
    _, params, batch, optimizer, update = setup
    state = learner_lib.create_train_state(params, optimizer, ewma=True)
    behav = batch.behav_logp.copy()
    behav[1, 5] = np.nan  # one generated token of one row: a broken sampler
    new, metrics = update(state, batch.replace(behav_logp=behav), jax.random.key(0), 0.9)
    _assert_skipped(state, new, metrics)


def test_inf_in_the_logits_skips_the_update(setup):
    _, params, batch, optimizer, update = setup
    # An inf weight of the output layer makes one logit inf: the log-softmax is NaN.
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    path, leaf = next((p, x) for p, x in reversed(flat) if x.ndim == 2)
    bad = jax.tree_util.tree_map_with_path(
        lambda p, x: x.at[0, 0].set(jnp.inf) if p == path else x, params)
    state = learner_lib.create_train_state(bad, optimizer)
    new, metrics = update(state, batch, jax.random.key(0), 0.0)
    assert not np.isfinite(float(metrics["loss/policy"])) or not np.isfinite(float(metrics["perf/grad_norm"]))
    _assert_skipped(state, new, metrics)


def test_run_stops_after_consecutive_nonfinite_steps(tmp_path, tiny_config):
    c = tiny_config(6)
    c.warmstart.enabled = False
    c.train.max_nonfinite_skips = 2
    cluster = RLCluster(c, str(tmp_path), log=lambda *a: None)
    real = cluster.runtime.next_groups
    poisoned_at = {1, 2}

    def next_groups(step, version):
        trajs, info = real(step, version)
        if step in poisoned_at:  # group 1's first episode arrives with a NaN behaviour log-prob
            i = next(i for i, t in enumerate(trajs) if t.group_id == 1)
            behav = trajs[i].behav_logp.copy()
            behav[np.flatnonzero(trajs[i].loss_mask)[0]] = np.nan
            trajs[i] = dataclasses.replace(trajs[i], behav_logp=behav)
        return trajs, info

    cluster.runtime.next_groups = next_groups
    try:
        cluster.runtime.start(0)
        m0 = cluster.train_step(0)
        assert m0["train/skipped_nonfinite"] == 0.0
        m1 = cluster.train_step(1)
        assert m1["train/skipped_nonfinite"] == 1.0 and m1["train/skipped_nonfinite_total"] == 1.0
        with pytest.raises(RuntimeError, match=r"max_nonfinite_skips.*\(1, "):
            cluster.train_step(2)
    finally:
        cluster.close()
