"""Exact old logits while sampling: the interruption route and the dedicated scorer process.

Both must give, for every generated token, the learner-numerics (float32) log-prob under
the version the token was sampled with, without changing what is sampled.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import psutil
import pytest

from jaxrl_async.core.buckets import bucket
from jaxrl_async.envs import make_env
from jaxrl_async.envs.tokenizer import TOKENIZER
from jaxrl_async.models import transformer as model_lib
from jaxrl_async.rollout.sampler import Sampler
from jaxrl_async.rollout.trajectory import collate
from jaxrl_async.runtime.scorer import LogProbScorer, ScorerError
from jaxrl_async.runtime.versions import VersionStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LEN = 64
B = 8
CFG = model_lib.ModelConfig(vocab_size=TOKENIZER.vocab_size, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                            max_len=MAX_LEN)
SWITCH_AT = 8


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    """Versions 0 and 1 (clearly different params) published in a ring buffer."""
    directory = str(tmp_path_factory.mktemp("versions"))
    graphdef, p0 = model_lib.init_model(CFG, seed=0)
    p1 = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), p0)
    store = VersionStore(directory, 4, p0, writer=True)
    store.publish(0, p0)
    store.publish(1, p1)
    return directory, graphdef, {0: p0, 1: p1}


@pytest.fixture(scope="module")
def scorer(ring):
    """One scorer process for the module (started first: it imports JAX while we compile)."""
    # A short wait for versions not yet on disk: test_..._unknown_versions asks for one never published.
    s = LogProbScorer().start(ring[0], 4, CFG, seed=0, warmup_rows=B, disk_wait_s=3.0)
    yield s
    s.close()


def _run(ring, numerics, old_logp=None, scorer=None, switch_at=SWITCH_AT, max_turns=(4,) * B):
    _, graphdef, params = ring
    sampler = Sampler(graphdef, CFG, model_lib.Numerics(numerics), exact_route=old_logp, scorer=scorer)
    sampler.update_params(params[0], 0)
    envs = [make_env("search", n=8, max_turns=m) for m in max_turns]
    return sampler.generate(envs, list(range(B)), [i // 2 for i in range(B)], jax.random.key(3),
                            weight_source=lambda step: (params[1], 1) if step >= switch_at else None,
                            chunk=switch_at)


@pytest.fixture(scope="module")
def runs(ring, scorer):
    out = {}
    for numerics in ("fp32", "bf16"):
        for mode in (None, "interrupt", "dedicated"):
            out[numerics, mode] = _run(ring, numerics, mode, scorer if mode == "dedicated" else None)
    return out


def _reference(ring, batch):
    """Learner-numerics log-prob of every token under the version it is tagged with."""
    _, graphdef, params = ring
    per_version = {v: np.asarray(model_lib.token_logprobs(graphdef, p, batch.tokens)) for v, p in params.items()}
    ref = np.zeros_like(batch.behav_logp)
    for v, lp in per_version.items():
        sel = batch.versions == v
        ref[sel] = lp[sel]
    return ref, per_version


@pytest.mark.parametrize("numerics", ["fp32", "bf16"])
def test_both_routes_give_the_exact_old_logp_and_leave_sampling_unchanged(runs, ring, numerics):
    plain = collate(runs[numerics, None][0], MAX_LEN)
    assert plain.old_logp is None and runs[numerics, None][1].old_logp_forward_passes == 0
    batches = {}
    for mode in ("interrupt", "dedicated"):
        trajs, stats = runs[numerics, mode]
        assert stats.weight_switches == 1
        batch = batches[mode] = collate(trajs, MAX_LEN)
        # The route does not touch sampling: the same tokens, log-probs and versions.
        for k in ("tokens", "loss_mask", "behav_logp", "versions"):
            np.testing.assert_array_equal(getattr(batch, k), getattr(plain, k), err_msg=f"{mode}: {k}")
    gen, versions = plain.loss_mask, plain.versions
    assert set(np.unique(versions[gen])) == {0, 1}  # a real mid-episode switch
    ref, per_version = _reference(ring, plain)
    for mode, batch in batches.items():
        old = batch.old_logp
        assert (old[~gen] == 0).all(), f"{mode}: prompt/env tokens must have old_logp 0"
        assert (old[gen] < 0).all()
        np.testing.assert_allclose(old[gen], ref[gen], atol=1e-5, err_msg=mode)
        # ... and it really is each token's own version, not the other one.
        for v in (0, 1):
            sel = gen & (versions == v)
            assert np.abs(old[sel] - per_version[1 - v][sel]).max() > 1e-3
    np.testing.assert_allclose(batches["interrupt"].old_logp, batches["dedicated"].old_logp, atol=1e-5)
    diff = np.abs(batches["interrupt"].old_logp[gen] - plain.behav_logp[gen])
    if numerics == "fp32":
        assert diff.max() < 1e-5  # same numerics: pi_old == mu
    else:
        assert 1e-5 < diff.mean() < 0.05  # the training-inference mismatch, visible in pi_old / mu


def test_stall_and_forward_pass_accounting(runs):
    for numerics in ("fp32", "bf16"):
        i_stats = runs[numerics, "interrupt"][1]
        # One batched forward at the switch, one at the end.
        assert i_stats.old_logp_forward_passes == 2
        assert i_stats.old_logp_stall_s > 0 and i_stats.old_logp_submit_s == 0
        trajs, d_stats = runs[numerics, "dedicated"]
        # At least one request per decode step at which a segment ended, at most one per segment.
        turns = sum(t.num_turns for t in trajs)
        assert 1 < d_stats.old_logp_forward_passes <= turns + B
        assert d_stats.old_logp_submit_s > 0


@pytest.mark.parametrize("mode", ["interrupt", "dedicated"])
def test_episodes_finished_before_the_switch_keep_their_own_version(ring, scorer, mode):
    # One-turn episodes end under version 0 before the switch; the others span it.
    trajs, stats = _run(ring, "fp32", mode, scorer if mode == "dedicated" else None, switch_at=16,
                        max_turns=(1, 4) * (B // 2))
    assert stats.weight_switches == 1
    batch = collate(trajs, MAX_LEN)
    gen = batch.loss_mask
    only_v0 = [i for i, t in enumerate(trajs) if (t.versions[t.loss_mask] == 0).all()]
    assert only_v0 and len(only_v0) < B
    ref, _ = _reference(ring, batch)
    np.testing.assert_allclose(batch.old_logp[gen], ref[gen], atol=1e-5)


def test_scorer_answers_match_the_learner_and_fail_loudly_on_unknown_versions(ring, scorer):
    _, graphdef, params = ring
    tokens = np.random.default_rng(0).integers(0, TOKENIZER.vocab_size, (3, MAX_LEN)).astype(np.int32)
    before = scorer.stats.requests
    good = scorer.submit(tokens, 1)
    bad = scorer.submit(tokens, 99)  # never published
    again = scorer.submit(tokens[:1], 0)
    with pytest.raises(ScorerError, match="99"):
        scorer.collect([bad])
    out = scorer.collect([good, again])  # the scorer kept serving after the failure
    assert out[good].shape == (3, MAX_LEN) and out[again].shape == (1, MAX_LEN)
    np.testing.assert_allclose(out[good], model_lib.token_logprobs(graphdef, params[1], tokens), atol=1e-5)
    np.testing.assert_allclose(out[again], model_lib.token_logprobs(graphdef, params[0], tokens[:1]), atol=1e-5)
    assert scorer.stats.requests == before + 3
    with pytest.raises(KeyError):
        scorer.collect([good])  # each answer is handed out once
    assert [bucket(k) for k in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]


def test_scorer_waits_for_a_version_still_being_written(ring, scorer):
    """A sampler can hold a version from the learner's shared memory before the learner's background
    write puts it in the ring buffer: the scorer waits for it instead of failing."""
    directory, graphdef, params = ring
    p2 = jax.tree.map(lambda x: x * 0.9, params[1])
    tokens = np.random.default_rng(1).integers(0, TOKENIZER.vocab_size, (2, MAX_LEN)).astype(np.int32)
    rid = scorer.submit(tokens, 2)  # not in the ring buffer yet
    time.sleep(1.0)
    writer = VersionStore(directory, 4, params[0], writer=True)
    writer.publish(2, p2)
    out = scorer.collect([rid], timeout=60)
    np.testing.assert_allclose(out[rid], model_lib.token_logprobs(graphdef, p2, tokens), atol=1e-5)


def test_invalid_configurations_raise(ring):
    _, graphdef, _ = ring
    with pytest.raises(ValueError, match="scorer"):
        Sampler(graphdef, CFG, model_lib.Numerics("fp32"), exact_route="dedicated")
    with pytest.raises(ValueError, match="exact_route"):
        Sampler(graphdef, CFG, model_lib.Numerics("fp32"), exact_route="snapshot")


def _gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_scorer_exits_when_its_parent_is_killed(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from jaxrl_async.runtime.scorer import LogProbScorer
        s = LogProbScorer().start({str(tmp_path)!r}, 2, {CFG.__dict__!r}, seed=0)
        s.wait_ready()
        print(s.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert not _gone(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _gone(pid), "the scorer outlived its parent"
    finally:
        parent.kill()
        parent.wait()


def test_dedicated_route_with_continuous_batching_scores_every_episode(ring, scorer):
    # 3B episodes through B slots (slots take the next episode as theirs end), a switch in the middle:
    # every generated token gets the exact old log-prob of its own version from the scorer.
    _, graphdef, params = ring
    n = 3 * B
    sampler = Sampler(graphdef, CFG, model_lib.Numerics("bf16"), exact_route="dedicated", scorer=scorer)
    sampler.update_params(params[0], 0)
    envs = [make_env("search", n=8, max_turns=4) for _ in range(n)]
    trajs, stats = sampler.generate(envs, list(range(n)), [i // 2 for i in range(n)], jax.random.key(4),
                                    weight_source=lambda step: (params[1], 1) if step >= 16 else None, chunk=8,
                                    slots=B)
    assert stats.slots == B and stats.episodes == n and stats.weight_switches == 1
    batch = collate(trajs, MAX_LEN)
    gen = batch.loss_mask
    assert set(np.unique(batch.versions[gen])) == {0, 1}
    ref, _ = _reference(ring, batch)
    np.testing.assert_allclose(batch.old_logp[gen], ref[gen], atol=1e-5)
    assert (batch.old_logp[~gen] == 0).all()


def test_scorer_exits_when_closed(scorer):  # last: closes the module's scorer
    pid = scorer.pid
    assert scorer.alive()
    scorer.close()
    assert _gone(pid) and not scorer.alive()
    with pytest.raises(ScorerError):
        scorer.submit(np.zeros((1, MAX_LEN), np.int32), 0)
    scorer.close()  # idempotent

