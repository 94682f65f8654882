"""The inline runtime: sampling in the learner's process on a deterministic schedule.

At learner version `v` the batch is generated with version `max(v - lag, 0)`; with
partial rollouts it starts at one version older and switches after `switch_after` decode
steps. Everything random derives from (seed, step), so runs are reproducible and
resumable exactly.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from jaxrl_async.rollout.sampler import Sampler
from jaxrl_async.runtime.base import old_logp_metrics, staleness_bound


class InlineRuntime:
    """`Runtime` of one process: the sampler runs when the learner asks for a batch."""

    def __init__(self, config, sampler: Sampler, store, make_env, key, scorer=None):
        """store: the version ring buffer; make_env: the task's constructor; key: the sampling key
        (folded with the step); scorer: the dedicated route's scorer, closed with the runtime."""
        self.config = config
        self.bound = staleness_bound(config)
        self.scorer = scorer
        self.sampler = sampler
        self.store = store
        self.make_env = make_env
        self.key = key

    def start(self, version: int) -> None:
        del version

    def next_groups(self, step: int, version: int):
        """Generates the batch for learner `version`; returns (trajectories, info)."""
        rt, g, n = self.config.runtime, self.config.rl.groups_per_step, self.config.rl.group_size
        v_behav = max(version - rt.lag, 0)
        v_first = max(v_behav - 1, 0) if rt.partial_rollout else v_behav
        self.sampler.update_params(self.store.get(v_first), v_first)
        weight_source = None
        if v_first != v_behav:
            target = (self.store.get(v_behav), v_behav)
            weight_source = lambda s: target if s >= rt.switch_after else None  # noqa: E731
        seeds = np.random.default_rng([self.config.seed, step]).integers(0, self.config.eval.seed_offset, g)
        t0 = time.perf_counter()
        trajs, stats = self.sampler.generate(
            [self.make_env() for _ in range(g * n)], np.repeat(seeds, n).tolist(), np.repeat(np.arange(g), n).tolist(),
            jax.random.fold_in(self.key, step), weight_source, self.config.sampler.chunk,
            slots=self.config.sampler.slots or None)
        return trajs, {
            "rollout/tokens_per_s": stats.tokens_per_s,
            "rollout/weight_switches": float(stats.weight_switches),
            "perf/sample_s": time.perf_counter() - t0,
            **old_logp_metrics(stats),
        }

    def published(self, version: int) -> None:
        del version

    def checkpointed(self, step: int) -> None:
        del step

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
