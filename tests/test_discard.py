"""Discarded episodes (a user-simulator failure): flagged by the sampler, counted, never trained on."""

import types

import jax
import numpy as np
import pytest

from jaxrl_async.cluster import batch_from
from jaxrl_async.core import advantages as adv_lib
from jaxrl_async.envs import make_env
from jaxrl_async.envs.base import StepResult
from jaxrl_async.envs.tokenizer import TOKENIZER
from jaxrl_async.models import transformer as model_lib
from jaxrl_async.rollout.evaluate import rollout_metrics
from jaxrl_async.rollout.sampler import Sampler
from jaxrl_async.rollout.trajectory import Trajectory

MAX_LEN = 64


class FailingUserEnv:
    """A search env whose user simulator fails on the agent's first turn for the seeds in `fail`
    (what `Tau2Env.step` returns then: done, reward 0, `info['user_error']`)."""

    def __init__(self, fail):
        self.inner = make_env("search", n=8, max_turns=4)
        self.fail = set(fail)
        self.max_turn_tokens = self.inner.max_turn_tokens
        self.seed = None

    def reset(self, seed):
        self.seed = seed
        return self.inner.reset(seed)

    def step(self, action):
        if self.seed in self.fail:
            return StepResult(observation=[], reward=0.0, done=True,
                              info={"success": False, "latency_s": 0.0, "error": None, "user_error": True})
        return self.inner.step(action)


def _traj(reward, group, discarded=""):
    n = 6
    return Trajectory(tokens=np.arange(n, dtype=np.int32), loss_mask=np.array([0, 0, 1, 1, 0, 1], bool),
                      behav_logp=np.full(n, -0.5, np.float32), versions=np.zeros(n, np.int32), reward=reward,
                      success=reward == 1.0, num_turns=1, group_id=group, task_seed=group, discarded=discarded)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_kept_advantages_use_the_rest_of_the_group(estimator):
    rewards = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.5, 1.0, 0.0], np.float32)
    groups = np.repeat([0, 1, 2], 3)
    keep = np.array([True, True, False, True, True, True, False, True, False])
    adv, train = adv_lib.kept_episode_advantages(rewards, groups, keep, estimator)
    # Group 0 lost one: its baseline is the two kept. Group 1 is whole: as before. Group 2 kept one: dropped.
    np.testing.assert_array_equal(train, [True, True, False, True, True, True, False, False, False])
    np.testing.assert_allclose(adv[:2], adv_lib.episode_advantages(rewards[:2], groups[:2], estimator))
    np.testing.assert_allclose(adv[3:6], adv_lib.episode_advantages(rewards[3:6], groups[3:6], estimator))
    assert (adv[~train] == 0).all() and adv[0] > 0 > adv[1]
    # Nothing discarded: exactly episode_advantages.
    full, all_train = adv_lib.kept_episode_advantages(rewards, groups, np.ones(9, bool), estimator)
    np.testing.assert_array_equal(full, adv_lib.episode_advantages(rewards, groups, estimator))
    assert all_train.all()


def test_batch_drops_discarded_rows_and_keeps_its_shape():
    trajs = [_traj(1.0, 0), _traj(0.0, 0), _traj(0.0, 0, "user_error"), _traj(1.0, 1), _traj(0.0, 1, "user_error")]
    config = types.SimpleNamespace(rl=types.SimpleNamespace(advantage="grpo", normalize_std=True))
    batch = batch_from(trajs, config, 8)
    assert batch.shape == (5, 8)
    # The discarded rows and the lone survivor of group 1 never reach the loss.
    assert batch.loss_mask[:2].any(axis=1).all() and not batch.loss_mask[2:].any()
    assert (batch.advantages[2:] == 0).all()
    assert batch.advantages[0, 2] > 0 > batch.advantages[1, 2]
    m = rollout_metrics(trajs, 0, 2, "tau2")
    assert m["tau2/user_errors"] == 2.0 and m["rollout/discarded"] == 2.0
    assert m["rollout/success_rate"] == pytest.approx(2 / 3)  # over the 3 kept episodes
    assert "tau2/user_errors" not in rollout_metrics(trajs, 0, 2)


def test_sampler_flags_a_user_failure_as_discarded():
    cfg = model_lib.ModelConfig(vocab_size=TOKENIZER.vocab_size, d_model=32, n_layers=1, n_heads=4, d_ff=64,
                                max_len=MAX_LEN)
    graphdef, params = model_lib.init_model(cfg, seed=0)
    sampler = Sampler(graphdef, cfg, model_lib.Numerics("fp32"))
    sampler.update_params(params, 0)
    seeds = [0, 1, 2, 3]
    trajs, _ = sampler.generate([FailingUserEnv(fail={1, 2}) for _ in seeds], seeds, [0, 0, 1, 1],
                                jax.random.key(0), slots=2)
    assert [t.discarded for t in trajs] == ["", "user_error", "user_error", ""]
    assert trajs[1].num_turns == 1 and trajs[1].reward == 0.0
    config = types.SimpleNamespace(rl=types.SimpleNamespace(advantage="grpo", normalize_std=True))
    batch = batch_from(trajs, config, MAX_LEN)
    # Both groups lost a member and keep one: nothing of this batch trains.
    assert not batch.loss_mask.any() and (batch.advantages == 0).all()
