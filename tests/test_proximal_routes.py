"""The proximal routes on real trajectories: exactness, collapse at lag 0, EWMA state, costs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_async import config as config_lib
from jaxrl_async.core import advantages as adv_lib
from jaxrl_async.core.losses import LossConfig, policy_loss
from jaxrl_async.envs import make_env
from jaxrl_async.envs.tokenizer import TOKENIZER
from jaxrl_async.learner import update as learner_lib
from jaxrl_async.learner.route import ProximalRoute
from jaxrl_async.metrics_log import read_metrics
from jaxrl_async.models import transformer as model_lib
from jaxrl_async.rollout.sampler import Sampler
from jaxrl_async.rollout.trajectory import collate
from jaxrl_async.runtime.versions import VersionStore
from jaxrl_async.train import train_and_evaluate

MAX_LEN = 64
B = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = model_lib.ModelConfig(vocab_size=TOKENIZER.vocab_size, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                                max_len=MAX_LEN)
    graphdef, p0 = model_lib.init_model(cfg, seed=0)
    noise = lambda k: jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(k), x.shape), p0)  # noqa: E731
    params = [p0, noise(1), noise(2)]
    store = VersionStore(str(tmp_path_factory.mktemp("versions")), 3, p0, writer=True)
    for v, p in enumerate(params):
        store.publish(v, p)
    return cfg, graphdef, params, store


def _batch(world, switch: bool, numerics="fp32", old_logp=None):
    cfg, graphdef, params, _ = world
    sampler = Sampler(graphdef, cfg, model_lib.Numerics(numerics), exact_route=old_logp)
    sampler.update_params(params[0], 0)
    ws = (lambda step: (params[1], 1) if step >= 8 else None) if switch else None
    trajs, _ = sampler.generate([make_env("search", n=8, max_turns=4) for _ in range(B)], list(range(B)),
                                [i // 2 for i in range(B)], jax.random.key(5), weight_source=ws, chunk=8)
    batch = collate(trajs, MAX_LEN)
    rewards = np.asarray([t.reward for t in trajs]).reshape(B // 2, 2) + np.arange(B).reshape(B // 2, 2)
    adv = adv_lib.group_relative(rewards)
    token_adv = adv_lib.broadcast_to_tokens(np.asarray(adv).reshape(-1), batch.loss_mask)
    return batch.replace(advantages=np.asarray(token_adv))


def _route(world, source, **proximal):
    cfg, graphdef, _, store = world
    c = config_lib.base_config()
    c.proximal.source = source
    for k, v in proximal.items():
        c.proximal[k] = v
    return ProximalRoute(c, graphdef, store, LossConfig(), [])


def _state(world, version, ewma=False):
    params = world[2][version]
    state = learner_lib.create_train_state(params, learner_lib.make_optimizer(1e-3, 1.0), ewma=ewma)
    return state.replace(version=jnp.asarray(version, jnp.int32))


def _reference(world, batch):
    """Direct learner-numerics forward with each token's own version."""
    _, graphdef, params, _ = world
    tokens = jnp.asarray(batch.tokens)
    ref = np.zeros(batch.tokens.shape, np.float32)
    for v in np.unique(batch.versions[batch.loss_mask]):
        lp = np.asarray(learner_lib.token_logprobs(graphdef, params[int(v)], tokens))
        sel = batch.loss_mask & (batch.versions == v)
        ref[sel] = lp[sel]
    return ref


def test_snapshot_equals_direct_forward_per_version_and_audits(world):
    batch = _batch(world, switch=True)
    assert set(np.unique(batch.versions[batch.loss_mask])) == {0, 1}
    out, m = _route(world, "snapshot")(_state(world, 2), batch, 2)
    gen = batch.loss_mask
    np.testing.assert_allclose(np.asarray(out.prox_logp)[gen], _reference(world, batch)[gen], atol=1e-5)
    assert m["proximal/forward_passes"] == 2 and m["proximal/dropped_episodes"] == 0
    # The audit shows recompute (version 2 as "old") measuring a larger discrepancy than the exact route.
    assert m["audit/recompute/mismatch/kl_k1"] != m["audit/exact/mismatch/kl_k1"]
    assert abs(m["audit/exact/mismatch/kl_k1"]) < 1e-5  # fp32 sampler: pi_old == mu exactly


def test_snapshot_evicted_versions_drop_or_fail(world, tmp_path):
    cfg, graphdef, params, _ = world
    small = VersionStore(str(tmp_path), 1, params[0], writer=True)
    small.publish(0, params[0])
    small.publish(1, params[1])  # evicts version 0
    batch = _batch(world, switch=True)
    c = config_lib.base_config()
    c.proximal.source = "snapshot"
    route = ProximalRoute(c, graphdef, small, LossConfig(), [])
    mask_before = batch.loss_mask.copy()
    out, m = route(_state(world, 2), batch, 2)
    np.testing.assert_array_equal(batch.loss_mask, mask_before)  # the route returns a new batch; its input is intact
    holds0 = (batch.loss_mask & (batch.versions == 0)).any(axis=1)
    assert m["proximal/dropped_episodes"] == holds0.sum() > 0
    assert not np.asarray(out.loss_mask)[holds0].any()
    c.proximal.on_evicted = "fail"
    with pytest.raises(RuntimeError, match="ring buffer"):
        ProximalRoute(c, graphdef, small, LossConfig(), [])(_state(world, 2), batch, 2)


@pytest.mark.parametrize("source", ["snapshot", "recompute", "bypass", "interrupt", "revised_ewma"])
def test_routes_leave_their_input_batch_unchanged(world, source):
    batch = _batch(world, switch=True, old_logp="interrupt")
    before = {f.name: None if getattr(batch, f.name) is None else np.array(getattr(batch, f.name), copy=True)
              for f in dataclasses.fields(batch)}
    assert before["old_logp"] is not None and before["prox_logp"] is None
    out, _ = _route(world, source)(_state(world, 2, ewma=source == "revised_ewma"), batch, 2)
    assert out is not batch and out.prox_logp is not None
    for name, value in before.items():
        now = getattr(batch, name)
        if value is None:
            assert now is None, name
        else:
            assert isinstance(now, np.ndarray), f"{name} became {type(now)}"
            np.testing.assert_array_equal(now, value, err_msg=name)


def test_lag_zero_fp32_routes_collapse_to_the_same_loss(world):
    batch = _batch(world, switch=False)
    _, graphdef, params, _ = world
    logp = learner_lib.token_logprobs(graphdef, params[0], jnp.asarray(batch.tokens))
    batch = batch.replace(old_logp=_batch(world, switch=False, old_logp="interrupt").old_logp)  # same trajectories
    losses = {}
    for source in ("recompute", "bypass", "snapshot", "interrupt"):
        out, _ = _route(world, source)(_state(world, 0), batch, 0)
        losses[source] = float(policy_loss(logp, out.prox_logp, out.behav_logp, out.advantages,
                                           out.loss_mask, LossConfig())[0])
    assert losses["recompute"] != 0.0
    for source in ("bypass", "snapshot", "interrupt"):
        assert losses[source] == pytest.approx(losses["recompute"], abs=1e-5)


def test_revised_ewma_matches_beta_to_staleness(world):
    batch = _batch(world, switch=True)
    route = _route(world, "revised_ewma", beta_min=0.0, beta_max=0.95)
    _, m = route(_state(world, 2, ewma=True), batch, 2)
    gen = batch.loss_mask
    s = float((2 - batch.versions[gen]).mean()) * 2  # 2 optimizer steps per version (default minibatches)
    assert m["proximal/ewma_beta"] == pytest.approx(s / (1 + s), rel=1e-5)
    assert m["proximal/param_copies"] == 1


def test_ewma_in_the_train_state_is_the_bias_corrected_average(world):
    cfg, graphdef, params, _ = world
    optimizer = learner_lib.make_optimizer(1e-2, 1.0)
    update = learner_lib.make_rl_update(graphdef, optimizer, LossConfig(), num_minibatches=1, num_epochs=1)
    # A copy: the update donates the state, and the module's `world` params must outlive this test.
    state = learner_lib.create_train_state(jax.tree.map(jnp.copy, params[0]), optimizer, ewma=True)
    batch = _batch(world, switch=False)
    jb = jax.tree.map(jnp.asarray, batch.replace(prox_logp=batch.behav_logp))
    beta, history = 0.7, []
    for i in range(3):
        state, _ = update(state, jb, jax.random.key(i), beta)
        history.append(jax.tree.map(np.asarray, state.params))
    w = np.array([beta ** (2 - i) for i in range(3)])
    expect = jax.tree.map(lambda *xs: sum(wi * x for wi, x in zip(w, xs)) / w.sum(), *history)
    for a, b in zip(jax.tree.leaves(state.ewma), jax.tree.leaves(expect)):
        np.testing.assert_allclose(np.asarray(a), b, atol=1e-6)
    assert float(state.ewma_count) == pytest.approx(1 + beta + beta ** 2)


def test_bad_proximal_settings_fail_at_startup(tiny_config):
    c = tiny_config()
    c.proximal.ewma_beta = 1.0
    with pytest.raises(ValueError, match="ewma_beta"):
        config_lib.validate(c)
    c = tiny_config()
    c.proximal.source = "snapshots"
    with pytest.raises(ValueError, match="proximal.source.*snapshot"):
        config_lib.validate(c)
    c = tiny_config()
    c.runtime.lag, c.runtime.ring_capacity = 2, 2
    with pytest.raises(ValueError, match="ring_capacity"):
        config_lib.validate(c)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["snapshot", "dedicated", "interrupt", "recompute", "bypass", "loglinear", "ewma",
                                    "revised_ewma"])
def test_every_route_trains_inline_with_staleness(tmp_path, source, tiny_config):
    c = tiny_config(3)
    c.proximal.source = source
    c.runtime.lag, c.runtime.partial_rollout, c.runtime.switch_after, c.sampler.chunk = 1, True, 8, 4
    c.warmstart.enabled = False
    c.train.eval_every = c.train.checkpoint_every = 3
    train_and_evaluate(c, str(tmp_path), progress=False)
    rows = [r for r in read_metrics(str(tmp_path)) if "loss/policy" in r]
    assert len(rows) == 3 and all(np.isfinite(r["loss/policy"]) for r in rows)
    assert rows[-1]["staleness/max"] == 2
    assert "proximal/forward_passes" in rows[-1]
    if source == "snapshot":
        assert rows[-1]["proximal/forward_passes"] == 2
    if source in ("dedicated", "interrupt"):
        assert rows[-1]["proximal/forward_passes"] == 0 and rows[-1]["proximal/sampler_forward_passes"] > 0
    if source in ("snapshot", "dedicated", "interrupt"):
        # fp32 sampler: the exact old log-probs are the behaviour log-probs.
        assert abs(rows[-1]["audit/exact/mismatch/kl_k1"]) < 1e-5
        assert "audit/recompute/mismatch/kl_k1" in rows[-1]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["snapshot", "dedicated", "interrupt"])
def test_exact_routes_train_in_process_runtime(tmp_path, source, tiny_config):
    c = tiny_config(4)
    c.runtime.mode, c.runtime.max_staleness, c.runtime.sampler_groups = "process", 1, 2
    c.proximal.source = source
    c.warmstart.enabled = False
    c.train.eval_every = c.train.checkpoint_every = 4
    train_and_evaluate(c, str(tmp_path), progress=False)
    rows = [r for r in read_metrics(str(tmp_path)) if "loss/policy" in r]
    assert len(rows) == 4 and all(np.isfinite(r["loss/policy"]) for r in rows)
    assert all(abs(r["audit/exact/mismatch/kl_k1"]) < 1e-5 for r in rows)


@pytest.mark.slow
def test_revised_ewma_resume_reproduces_uninterrupted_run(tmp_path, tiny_config, comparable_metrics):
    def cfg(steps):
        c = tiny_config(steps)
        c.proximal.source = "revised_ewma"
        c.runtime.lag = 1
        return c

    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train_and_evaluate(cfg(4), full, progress=False)
    train_and_evaluate(cfg(2), part, progress=False)
    train_and_evaluate(cfg(4), part, progress=False)
    assert comparable_metrics(read_metrics(part)) == comparable_metrics(read_metrics(full))


# The three-term loss: `proximal.anchor` beside an exact source (docs/design.md sections 2.6 and 3.1).


@pytest.mark.parametrize("source, anchor", [("snapshot", "recompute"), ("snapshot", "ewma"),
                                            ("interrupt", "revised_ewma")])
def test_anchor_route_fills_old_and_prox(world, source, anchor):
    _, graphdef, params, _ = world
    batch = _batch(world, switch=True, old_logp="interrupt")
    uses_ewma = anchor != "recompute"
    state = _state(world, 2, ewma=uses_ewma)  # a fresh EWMA is a copy of params[2]
    out, m = _route(world, source, anchor=anchor)(state, batch, 2)
    gen = batch.loss_mask
    # old_logp: the exact pi_old of each token's version; prox_logp: the anchor (version 2's weights).
    np.testing.assert_allclose(np.asarray(out.old_logp)[gen], _reference(world, batch)[gen], atol=1e-5)
    now = np.asarray(learner_lib.token_logprobs(graphdef, params[2], jnp.asarray(batch.tokens)))
    np.testing.assert_allclose(np.asarray(out.prox_logp)[gen], now[gen], atol=1e-5)
    # One more forward for the anchor (snapshot: one per version, 2 here; interrupt: none of its own).
    assert m["proximal/forward_passes"] == (2 if source == "snapshot" else 0) + 1
    assert m["proximal/param_copies"] == (2 if source == "snapshot" else 1) + uses_ewma
    assert ("proximal/ewma_beta" in m) == (anchor == "revised_ewma")
    # The audit still compares the exact pi_old (not the anchor) with what recompute would give.
    assert abs(m["audit/exact/mismatch/kl_k1"]) < 1e-5  # fp32 sampler: pi_old == mu
    assert m["audit/recompute/mismatch/kl_k1"] != m["audit/exact/mismatch/kl_k1"]
    assert batch.prox_logp is None  # the input batch is unchanged


def test_update_reads_old_logp_only_in_the_three_term_form(world):
    cfg, graphdef, params, _ = world
    optimizer = learner_lib.make_optimizer(1e-3, 1.0)
    batch = _batch(world, switch=True, old_logp="interrupt")
    now = np.asarray(learner_lib.token_logprobs(graphdef, params[2], jnp.asarray(batch.tokens)))
    jb = jax.tree.map(jnp.asarray, batch.replace(prox_logp=now))  # old_logp: exact; prox_logp: the anchor

    def run(three_term, b):
        update = learner_lib.make_rl_update(graphdef, optimizer, LossConfig(), num_minibatches=1,
                                            three_term=three_term, donate=False)
        return update(learner_lib.create_train_state(params[2], optimizer), b, jax.random.key(0))[1]

    two, three = run(False, jb), run(True, jb)
    assert not any(k.startswith("staleness/is_") for k in two)
    assert {"staleness/is_weight_mean", "staleness/kl_k1", "staleness/mask_frac"} <= set(three)
    assert float(three["staleness/is_weight_mean"]) != 1.0  # stale tokens carry a weight
    # The two-term update ignores old_logp entirely.
    for k, v in run(False, jb.replace(old_logp=None)).items():
        np.testing.assert_array_equal(v, two[k], err_msg=k)
    # old_logp == prox_logp: the three-term update is the two-term one.
    same = run(True, jb.replace(old_logp=jb.prox_logp))
    np.testing.assert_allclose(same["loss/policy"], two["loss/policy"], rtol=1e-6)
    np.testing.assert_allclose(same["perf/grad_norm"], two["perf/grad_norm"], rtol=1e-5)
    with pytest.raises(ValueError, match="old_logp"):
        run(True, jb.replace(old_logp=None))


def test_anchor_needs_an_exact_source(tiny_config):
    for source in ("recompute", "bypass", "loglinear", "ewma"):
        c = tiny_config()
        c.proximal.source, c.proximal.anchor = source, "recompute"
        with pytest.raises(ValueError, match=r"proximal\.anchor.*exact proximal\.source"):
            config_lib.validate(c)
    c = tiny_config()
    c.proximal.source, c.proximal.anchor = "snapshot", "bypass"
    with pytest.raises(ValueError, match=r"proximal\.anchor"):
        config_lib.validate(c)
    for anchor in ("recompute", "ewma", "revised_ewma", "", None):
        c = tiny_config()
        c.proximal.source, c.proximal.anchor = "dedicated", anchor
        config_lib.validate(c)
        assert (config_lib.proximal_anchor(c) is None) == (not anchor)
    c = tiny_config()
    c.loss.staleness_is_mode = "tokens"
    with pytest.raises(ValueError, match="staleness_is_mode"):
        config_lib.loss_config_from(c)


@pytest.mark.slow
def test_snapshot_with_recompute_anchor_trains(tmp_path, tiny_config):
    c = tiny_config(2)
    c.proximal.source, c.proximal.anchor = "snapshot", "recompute"
    c.runtime.lag, c.runtime.partial_rollout, c.runtime.switch_after, c.sampler.chunk = 1, True, 8, 4
    c.warmstart.enabled = False
    c.train.eval_every = c.train.checkpoint_every = 2
    train_and_evaluate(c, str(tmp_path), progress=False)
    rows = [r for r in read_metrics(str(tmp_path)) if "loss/policy" in r]
    assert len(rows) == 2 and all(np.isfinite(r["loss/policy"]) for r in rows)
    last = rows[-1]
    assert last["staleness/max"] >= 1  # stale tokens: the anchor (version now) differs from pi_old
    assert np.isfinite(last["staleness/is_weight_mean"]) and "staleness/kl_k1" in last
    # One forward per version in the batch (param_copies counts them; the recompute anchor adds no copy),
    # plus one for the anchor.
    assert all(r["proximal/forward_passes"] == r["proximal/param_copies"] + 1 for r in rows)
    assert abs(last["mismatch/kl_k1"]) < 1e-5  # fp32 sampler: the discrepancy term sees pi_old == mu
