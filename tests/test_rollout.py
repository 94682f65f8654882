"""Rollout bookkeeping: per-token masks, behaviour log-probs and versions, partial rollouts."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_async.core import advantages as adv_lib
from jaxrl_async.envs import make_env
from jaxrl_async.envs.tokenizer import TOKENIZER
from jaxrl_async.learner import update as learner_lib
from jaxrl_async.models import transformer as model_lib
from jaxrl_async.rollout.sampler import RolloutStats, Sampler
from jaxrl_async.rollout.trajectory import collate

MAX_LEN = 64
B = 8


@pytest.fixture(scope="module")
def setup():
    cfg = model_lib.ModelConfig(vocab_size=TOKENIZER.vocab_size, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                                max_len=MAX_LEN)
    graphdef, p0 = model_lib.init_model(cfg, seed=0)
    # A second version far enough from the first that their log-probs clearly differ.
    p1 = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), p0)
    return cfg, graphdef, p0, p1


def _envs():
    return [make_env("search", n=8, max_turns=4) for _ in range(B)]


def _generate(setup, numerics, weight_source=None, chunk=8):
    cfg, graphdef, p0, _ = setup
    sampler = Sampler(graphdef, cfg, numerics)
    sampler.update_params(p0, 0)
    return sampler.generate(_envs(), list(range(B)), [i // 2 for i in range(B)], jax.random.key(3),
                            weight_source=weight_source, chunk=chunk)


def test_layout_and_behaviour_logp_match_learner_at_fp32(setup):
    cfg, graphdef, p0, _ = setup
    trajs, stats = _generate(setup, model_lib.Numerics("fp32"))
    assert stats.generated_tokens == sum(int(t.loss_mask.sum()) for t in trajs) > 0
    batch = collate(trajs, MAX_LEN)
    gen = batch.loss_mask
    # Prompt and environment tokens: no version, no behaviour log-prob; every episode starts with BOS.
    assert (batch.versions[~gen] == -1).all() and (batch.behav_logp[~gen] == 0).all()
    assert (batch.versions[gen] == 0).all() and (batch.behav_logp[gen] < 0).all()
    assert (batch.tokens[:, 0] == TOKENIZER.BOS).all()
    assert not gen[:, 0].any()
    # With fp32 inference numerics the sampler's log-probs are the learner's, token by token.
    learner = np.asarray(learner_lib.token_logprobs(graphdef, p0, jnp.asarray(batch.tokens)))
    np.testing.assert_allclose(batch.behav_logp[gen], learner[gen], atol=1e-5)
    for t in trajs:
        assert t.num_turns >= 1 and t.reward in (0.0, 1.0)


def test_bf16_behaviour_differs_slightly_from_learner(setup):
    cfg, graphdef, p0, _ = setup
    trajs, _ = _generate(setup, model_lib.Numerics("bf16"))
    batch = collate(trajs, MAX_LEN)
    gen = batch.loss_mask
    learner = np.asarray(learner_lib.token_logprobs(graphdef, p0, jnp.asarray(batch.tokens)))
    diff = np.abs(batch.behav_logp[gen] - learner[gen])
    assert 1e-5 < diff.mean() < 0.05


def test_mid_episode_switch_tags_versions_and_logs_each_versions_logp(setup):
    cfg, graphdef, p0, p1 = setup
    switch_at = 8
    trajs, stats = _generate(setup, model_lib.Numerics("fp32"),
                             weight_source=lambda step: (p1, 1) if step >= switch_at else None, chunk=switch_at)
    assert stats.weight_switches == 1
    batch = collate(trajs, MAX_LEN)
    gen, versions = batch.loss_mask, batch.versions
    assert set(np.unique(versions[gen])) == {0, 1}
    assert any(t.is_partial for t in trajs)
    # Within an episode versions never go back.
    for t in trajs:
        v = t.versions[t.loss_mask]
        assert (np.diff(v) >= 0).all()
    # Each token's behaviour log-prob is that of the version it is tagged with.
    tokens = jnp.asarray(batch.tokens)
    lp = {0: np.asarray(learner_lib.token_logprobs(graphdef, p0, tokens)),
          1: np.asarray(learner_lib.token_logprobs(graphdef, p1, tokens))}
    for v in (0, 1):
        sel = gen & (versions == v)
        np.testing.assert_allclose(batch.behav_logp[sel], lp[v][sel], atol=1e-5)
        assert np.abs(batch.behav_logp[sel] - lp[1 - v][sel]).max() > 1e-3


def test_forced_end_of_turn_is_context_not_action(setup):
    cfg, graphdef, p0, _ = setup
    # A one-token turn budget: most turns are closed by the rollout, not by the policy.
    envs = [make_env("search", n=8, max_turns=3, max_turn_tokens=1) for _ in range(B)]
    sampler = Sampler(graphdef, cfg, model_lib.Numerics("fp32"))
    sampler.update_params(p0, 0)
    trajs, _ = sampler.generate(envs, list(range(B)), list(range(B)), jax.random.key(0))
    forced = 0
    for t in trajs:
        for i in range(1, t.length):
            if t.tokens[i] == TOKENIZER.EOT and t.loss_mask[i - 1]:
                forced += not t.loss_mask[i]
                assert t.versions[i] == (0 if t.loss_mask[i] else -1)
    assert forced > 0


def test_advantages_land_on_generated_tokens_only(setup):
    trajs, _ = _generate(setup, model_lib.Numerics("fp32"))
    batch = collate(trajs, MAX_LEN)
    ep_adv = np.arange(1, B + 1, dtype=np.float32)
    tok_adv = np.asarray(adv_lib.broadcast_to_tokens(ep_adv, batch.loss_mask))
    assert (tok_adv[~batch.loss_mask] == 0).all()
    for i in range(B):
        assert (tok_adv[i][batch.loss_mask[i]] == ep_adv[i]).all()


def test_collate_rejects_overlong_trajectories(setup):
    trajs, _ = _generate(setup, model_lib.Numerics("fp32"))
    with pytest.raises(ValueError, match="exceeds"):
        collate(trajs, 4)


@pytest.fixture(scope="module")
def short_context():
    """A sampler whose context is 14 tokens (one compile for the tests below)."""
    cfg = model_lib.ModelConfig(vocab_size=TOKENIZER.vocab_size, d_model=32, n_layers=1, n_heads=4, d_ff=64,
                                max_len=14)
    graphdef, params = model_lib.init_model(cfg, seed=0)
    sampler = Sampler(graphdef, cfg, model_lib.Numerics("fp32"))
    sampler.update_params(params, 0)
    return sampler


def test_episodes_never_exceed_the_context_when_a_forced_end_of_turn_lands_at_max_len(short_context):
    # Prompt 5 tokens + two 2-token turns closed by the rollout (+ a 4-token observation):
    # the last forced EOT falls at position max_len = 14 just as the env ends the episode.
    sampler = short_context
    envs = [make_env("search", n=8, max_turns=2, max_turn_tokens=2) for _ in range(B)]
    trajs, _ = sampler.generate(envs, list(range(B)), list(range(B)), jax.random.key(14))
    assert max(t.length for t in trajs) == 14
    assert all(t.num_turns == 2 for t in trajs)
    collate(trajs, 14)  # fits the context


class _Abandonable:
    """The search env with an `abandon()` (as `Tau2Env` has): records whether the sampler called it."""

    def __init__(self, **kwargs):
        self.inner = make_env("search", n=8, **kwargs)
        self.max_turn_tokens = self.inner.max_turn_tokens
        self.ended_by_env = self.abandoned = False

    def reset(self, seed):
        return self.inner.reset(seed)

    def step(self, action):
        result = self.inner.step(action)
        self.ended_by_env |= result.done
        return result

    def abandon(self):
        self.abandoned = True


def test_an_episode_cut_by_the_context_is_abandoned_in_its_env(short_context):
    # Four 3-token turns do not fit in 14 tokens: episodes that the env has not ended run out of context.
    envs = [_Abandonable(max_turns=4, max_turn_tokens=3) for _ in range(B)]
    trajs, _ = short_context.generate(envs, list(range(B)), list(range(B)), jax.random.key(5))
    cut = [not e.ended_by_env for e in envs]
    assert any(cut)
    assert [e.abandoned for e in envs] == cut
    assert all(t.reward == 0.0 for t, c in zip(trajs, cut) if c)


# The device-side decode loop: many decode steps per device call, known context fed in the
# loop or prefilled in one batched forward.


@pytest.mark.parametrize("prefill_min", [None, 2, 16])
def test_switch_rereads_and_logs_each_versions_logp_whether_context_is_prefilled_or_fed(setup, prefill_min):
    cfg, graphdef, p0, p1 = setup
    sampler = Sampler(graphdef, cfg, model_lib.Numerics("fp32"), prefill_min=prefill_min)
    sampler.update_params(p0, 0)
    trajs, stats = sampler.generate(_envs(), list(range(B)), [i // 2 for i in range(B)], jax.random.key(3),
                                    weight_source=lambda step: (p1, 1) if step >= 8 else None, chunk=8)
    assert stats.weight_switches == 1
    # Host round trips only at turn ends and chunk boundaries, not per decode step.
    assert stats.loop_calls < stats.loop_steps <= stats.decode_steps
    if prefill_min is None:
        assert stats.prefill_calls == 0 and stats.decode_steps == stats.loop_steps
    elif prefill_min == 2:
        assert stats.prefill_calls > 0 and stats.prefill_tokens > 0
    batch = collate(trajs, MAX_LEN)
    gen, versions = batch.loss_mask, batch.versions
    assert set(np.unique(versions[gen])) == {0, 1}
    tokens = jnp.asarray(batch.tokens)
    for v, p in ((0, p0), (1, p1)):
        sel = gen & (versions == v)
        lp = np.asarray(learner_lib.token_logprobs(graphdef, p, tokens))
        np.testing.assert_allclose(batch.behav_logp[sel], lp[sel], atol=1e-5)


def test_same_key_same_rollout(setup):
    a, sa = _generate(setup, model_lib.Numerics("bf16"), weight_source=lambda s: None, chunk=4)
    b, sb = _generate(setup, model_lib.Numerics("bf16"), weight_source=lambda s: None, chunk=4)
    assert sa.decode_steps == sb.decode_steps
    for x, y in zip(a, b):
        for k in ("tokens", "loss_mask", "behav_logp", "versions"):
            np.testing.assert_array_equal(getattr(x, k), getattr(y, k))
    # The chunk only decides where the host looks for weights: without a switch it does not change sampling.
    c, _ = _generate(setup, model_lib.Numerics("bf16"))
    for x, y in zip(a, c):
        np.testing.assert_array_equal(x.tokens, y.tokens)


def test_prefill_then_decode_matches_decoding_token_by_token(setup):
    cfg, graphdef, p0, _ = setup
    num = model_lib.Numerics("fp32")
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(4, cfg.vocab_size, (2, 12)), jnp.int32)
    key = jax.random.key(0)
    cache = model_lib.init_cache(cfg, 2, num)
    for t in range(12):
        ref, cache = model_lib.decode_step(graphdef, p0, cache, tokens[:, t], jnp.full((2,), t, jnp.int32), num, key)
    # Row 0 prefills 11 tokens, row 1 only 5 (then 6 more); padding positions (>= max_len) write nothing.
    cache = model_lib.init_cache(cfg, 2, num)
    pos = np.tile(np.arange(11), (2, 1))
    pos[1, 5:] = MAX_LEN
    cache = model_lib.prefill(graphdef, p0, cache, tokens[:, :11], jnp.asarray(pos, jnp.int32), num)
    for t in range(5, 11):
        tok = jnp.stack([jnp.asarray(0, jnp.int32), tokens[1, t]])
        _, cache = model_lib.decode_step(graphdef, p0, cache, tok, jnp.asarray([MAX_LEN, t], jnp.int32), num, key)
    out, _ = model_lib.decode_step(graphdef, p0, cache, tokens[:, 11], jnp.full((2,), 11, jnp.int32), num, key)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


# Continuous batching: more episodes than KV-cache slots; a slot whose episode ends takes the next one.


@pytest.mark.parametrize("exact_route", [None, "interrupt"])
def test_continuous_batching_through_fewer_slots_keeps_versions_and_logp(setup, exact_route):
    cfg, graphdef, p0, p1 = setup
    n, slots = 3 * B, 5
    envs = [make_env("search", n=8, max_turns=4) for _ in range(n)]
    sampler = Sampler(graphdef, cfg, model_lib.Numerics("fp32"), exact_route=exact_route)
    sampler.update_params(p0, 0)
    trajs, stats = sampler.generate(envs, list(range(n)), [i // 2 for i in range(n)], jax.random.key(5),
                                    weight_source=lambda step: (p1, 1) if step >= 24 else None, chunk=8, slots=slots)
    assert stats.episodes == n and stats.slots == slots and stats.weight_switches == 1
    # Every episode ran to its end, in input order, with its own task seed and group.
    assert [t.task_seed for t in trajs] == list(range(n)) and [t.group_id for t in trajs] == [i // 2 for i in range(n)]
    assert all(t.num_turns >= 1 and (t.tokens[0] == TOKENIZER.BOS) for t in trajs)
    batch = collate(trajs, MAX_LEN)
    gen, versions = batch.loss_mask, batch.versions
    # Episodes started after the switch generate only under version 1; some episodes span it.
    assert set(np.unique(versions[gen])) == {0, 1}
    assert any(t.is_partial for t in trajs)
    assert (versions[-1][gen[-1]] == 1).all()
    tokens = jnp.asarray(batch.tokens)
    for v, p in ((0, p0), (1, p1)):
        sel = gen & (versions == v)
        lp = np.asarray(learner_lib.token_logprobs(graphdef, p, tokens))
        np.testing.assert_allclose(batch.behav_logp[sel], lp[sel], atol=1e-5)
        if exact_route is not None:  # the sampler's exact old log-probs: each token's own version
            np.testing.assert_allclose(batch.old_logp[sel], lp[sel], atol=1e-5)
    # Five slots decode fewer slot-steps than one slot per episode would: the same work in fewer rows.
    assert stats.decode_steps * slots < sum(len(t.tokens) for t in trajs) * 2


def test_continuous_batching_is_deterministic_and_one_slot_per_episode_is_the_plain_batch(setup):
    cfg, graphdef, p0, _ = setup
    sampler = Sampler(graphdef, cfg, model_lib.Numerics("bf16"))
    sampler.update_params(p0, 0)

    def run(slots):
        return sampler.generate(_envs(), list(range(B)), list(range(B)), jax.random.key(9), slots=slots)

    (a, sa), (b, sb), (c, sc) = run(3), run(3), run(None)
    for x, y in zip(a, b):
        for k in ("tokens", "loss_mask", "behav_logp", "versions"):
            np.testing.assert_array_equal(getattr(x, k), getattr(y, k))
    assert sa.decode_steps == sb.decode_steps and sc.slots == B
    d, _ = run(B)  # as many slots as episodes: exactly the plain batch
    for x, y in zip(c, d):
        np.testing.assert_array_equal(x.tokens, y.tokens)
    assert sa.decode_steps > sc.decode_steps  # three slots take more decode steps than eight
    with pytest.raises(ValueError, match="slots"):
        run(0)


def test_sampler_slots_config_is_validated_and_reaches_generate(setup, monkeypatch):
    from jaxrl_async import config as config_lib
    from jaxrl_async.runtime import base as runtime_base

    for bad in (-1, True):
        c = config_lib.base_config()
        c.sampler.slots = bad
        with pytest.raises(ValueError, match=r"sampler\.slots"):
            config_lib.validate(c)
    c = config_lib.base_config()
    c.sampler.slots = 3
    config_lib.validate(c)
    seen = {}

    def fake_generate(envs, task_seeds, group_ids, key, weight_source=None, chunk=16, slots=None):
        seen["slots"], seen["episodes"] = slots, len(envs)
        return [], RolloutStats()

    cfg, graphdef, p0, _ = setup
    sampler = Sampler(graphdef, cfg, model_lib.Numerics("fp32"))
    monkeypatch.setattr(sampler, "generate", fake_generate)
    runtime_base.generate_sampler_batch(sampler, lambda: make_env("search", n=8, max_turns=4), c, 0, 0, 0, None, 0.0)
    assert seen == {"slots": 3, "episodes": c.runtime.sampler_groups * c.rl.group_size}


# The shared-prefix KV cache: a prompt prefix common to every episode is prefilled once per version.


class _PrefixedEnv:
    """The search env behind a 20-token prefix shared by every episode and a token per task seed."""

    def __init__(self):
        self.inner = make_env("search", n=8, max_turns=4)
        self.max_turn_tokens = self.inner.max_turn_tokens

    def reset(self, seed):
        prompt = self.inner.reset(seed)
        return prompt[:1] + list(range(20, 40)) + [40 + seed % 3] + prompt[1:]

    def step(self, action):
        return self.inner.step(action)


def test_prefix_cache_gives_the_same_rollout_as_prefilling(setup):
    cfg, graphdef, p0, p1 = setup
    n = 12
    out = {}
    for prefix_cache in (False, True):
        sampler = Sampler(graphdef, cfg, model_lib.Numerics("fp32"), prefill_min=8, prefix_cache=prefix_cache)
        sampler.update_params(p0, 0)
        out[prefix_cache] = sampler.generate([_PrefixedEnv() for _ in range(n)], list(range(n)),
                                             [i // 2 for i in range(n)], jax.random.key(7),
                                             weight_source=lambda step: (p1, 1) if step >= 40 else None, chunk=8,
                                             slots=5)
    (a, sa), (b, sb) = out[False], out[True]
    assert sa.weight_switches == sb.weight_switches == 1 and sa.decode_steps == sb.decode_steps
    # Each episode start and the re-reads after the switch take the 21-token prefix; it is
    # prefilled once per version.
    assert sb.prefix_computes == 2 and sb.prefix_hits >= n + 5 and sb.prefix_tokens == 21 * sb.prefix_hits
    assert sa.prefix_hits == 0 and sb.prefill_tokens < sa.prefill_tokens
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.versions, y.versions)
        np.testing.assert_array_equal(x.loss_mask, y.loss_mask)
        np.testing.assert_allclose(x.behav_logp, y.behav_logp, atol=1e-5)


# Env steps in a worker pool: while one episode waits on its env, the other slots keep decoding.


class _SlowEnv:
    """The search env whose even task seeds answer after `delay` seconds (a user or a tool)."""

    def __init__(self, delay):
        self.inner = make_env("search", n=8, max_turns=4)
        self.max_turn_tokens = self.inner.max_turn_tokens
        self.delay, self.seed = delay, None

    def reset(self, seed):
        self.seed = seed
        return self.inner.reset(seed)

    def step(self, action):
        if self.seed % 2 == 0:
            time.sleep(self.delay)
        return self.inner.step(action)


def test_env_workers_overlap_env_steps_with_decoding_and_sample_the_same(setup):
    from jaxrl_async.rollout.sampler import EpisodeSampling

    cfg, graphdef, p0, p1 = setup
    n = 8
    keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(11), n)), np.uint32)
    samp = EpisodeSampling(keys, np.ones(n, np.float32), np.ones(n, np.float32))
    out = {}
    for workers in (0, 4):
        sampler = Sampler(graphdef, cfg, model_lib.Numerics("fp32"), env_workers=workers)
        sampler.update_params(p0, 0)
        reported = []
        out[workers] = sampler.generate([_SlowEnv(0.05) for _ in range(n)], list(range(n)), [i // 2 for i in range(n)],
                                        jax.random.key(0), slots=6, episode_sampling=samp,
                                        on_done=lambda i, t, seen=reported: seen.append(i))
        assert sorted(reported) == list(range(n))  # every episode reported as it ended, the last ones too
    (a, sa), (b, sb) = out[0], out[4]
    assert sa.env_overlap_calls == 0 and sb.env_overlap_calls > 0
    # Each episode's own key: the same tokens whenever its env answered; behav_logp is the learner's.
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.loss_mask, y.loss_mask)
        assert x.reward == y.reward and x.num_turns == y.num_turns
    # A slot that waited on its env kept its KV cache: behav_logp is the learner's log-prob.
    batch = collate(b, MAX_LEN)
    lp = np.asarray(learner_lib.token_logprobs(graphdef, p0, jnp.asarray(batch.tokens)))
    np.testing.assert_allclose(batch.behav_logp[batch.loss_mask], lp[batch.loss_mask], atol=1e-5)
    with pytest.raises(ValueError, match="env_workers"):
        Sampler(graphdef, cfg, model_lib.Numerics("fp32"), env_workers=-1)
