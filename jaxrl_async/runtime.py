"""Where a training batch comes from: the inline and the process runtimes.

Both hand the learner loop `G` complete groups of `n` trajectories per RL step and read
weights from the parameter-version ring buffer (`versions.VersionStore`), which the
learner fills after every update.

- `InlineRuntime`: sampling in the learner's process on a deterministic schedule. At
  learner version `v` the batch is generated with version `max(v - lag, 0)`; with
  partial rollouts it starts at one version older and switches after `switch_after`
  decode steps. Everything random derives from (seed, step), so runs are reproducible
  and resumable exactly.
- `ProcessRuntime`: sampler processes generate continuously (see `sampler_process`);
  the learner takes the oldest groups from the spool queue, dropping (and counting)
  any older than `max_staleness`.
"""

from __future__ import annotations

import os
import shutil
import time

import jax
import numpy as np

from jaxrl_async import sampler_process
from jaxrl_async.config import min_ring_capacity
from jaxrl_async.old_logit import OldLogitScorer
from jaxrl_async.queue import TrajectoryQueue
from jaxrl_async.rollout import Sampler


def ring_capacity(config) -> int:
    """Versions the ring buffer keeps: the configured K, or the fewest the runtime needs."""
    if config.runtime.ring_capacity is not None:
        return config.runtime.ring_capacity
    return min_ring_capacity(config)


def make_sampler(config, graphdef, model_config, numerics, workdir: str, warmup_rows: int):
    """The sampler of the configured proximal route: (Sampler, OldLogitScorer or None).

    `interrupt` makes the sampler score in-flight segments under the outgoing version at
    every weight switch; `dedicated` starts an old-logit process beside it (reading the same
    ring buffer) that scores each segment as it is generated.
    """
    source = config.proximal.source
    mode = source if source in ("interrupt", "dedicated") else None
    scorer = None
    if mode == "dedicated":
        scorer = OldLogitScorer().start(sampler_process.versions_dir(workdir), ring_capacity(config), model_config,
                                        config.seed, warmup_rows=warmup_rows)
    sampler = Sampler(graphdef, model_config, numerics, config.sampler.temperature, old_logp=mode, scorer=scorer)
    return sampler, scorer


def old_logp_metrics(stats) -> dict:
    """Sampler-side cost of the interrupt and dedicated routes for one generate call."""
    return {"proximal/sampler_stall_s": stats.old_logp_stall_s,
            "proximal/sampler_forward_passes": float(stats.old_logp_forward_passes)}


def reset_dirs(workdir: str) -> None:
    """A fresh run in an old workdir: the previous run's versions and queued groups are void."""
    for d in (sampler_process.versions_dir(workdir), sampler_process.queue_dir(workdir)):
        shutil.rmtree(d, ignore_errors=True)


class InlineRuntime:
    def __init__(self, config, sampler: Sampler, store, make_env, key, scorer=None):
        self.config = config
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
            jax.random.fold_in(self.key, step), weight_source, self.config.sampler.chunk)
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


class ProcessRuntime:
    def __init__(self, config, workdir: str, epoch: int, resume_step: int | None):
        self.config = config
        self.bound = config.runtime.max_staleness
        g = config.rl.groups_per_step
        capacity = config.runtime.queue_capacity or (self.bound + 1) * g
        self.queue = TrajectoryQueue(sampler_process.queue_dir(workdir), capacity)
        self.recovered = self.queue.recover(resume_step) if resume_step is not None else 0
        self.pool = sampler_process.SamplerPool(config, workdir, epoch, ring_capacity(config), capacity)
        self.dropped_stale = 0

    def start(self, version: int) -> None:
        self.pool.shared.next_version.value = int(version)
        self.pool.start()

    def next_groups(self, step: int, version: int):
        """Takes the oldest `G` groups within the staleness bound; returns (trajectories, info)."""
        g = self.config.rl.groups_per_step
        self.queue.set_step(step)
        t0 = time.perf_counter()
        items, dropped = [], 0
        shared = self.pool.shared
        while len(items) < g:
            self.pool.check()
            want = min(g - len(items), self.queue.depth())
            if want == 0:
                time.sleep(0.01)
                continue
            # Counted as taken before they leave the queue, so the samplers' gate never under-counts.
            shared.taken.value = len(items) + want
            for item in self.queue.take(want, timeout=0):
                if version - item.start_version > self.bound:
                    dropped += 1  # should not happen under the gate; never trained on
                else:
                    items.append(item)
            shared.taken.value = len(items)
        # The next batch is for version + 1 (set before `taken` is reset: see Shared).
        shared.next_version.value = version + 1
        shared.taken.value = 0
        self.dropped_stale += dropped
        wait = time.perf_counter() - t0
        trajs = [t for item in items for t in item.trajectories]
        metas = [item.meta for item in items]
        return trajs, {
            "rollout/tokens_per_s": float(np.mean([m["tokens_per_s"] for m in metas])),
            "rollout/weight_switches": float(np.mean([m["weight_switches"] for m in metas])),
            "perf/learner_wait_s": wait,
            "perf/sampler_gate_wait_s": float(np.mean([m["gate_wait_s"] for m in metas])),
            "perf/sample_s": wait,
            "queue/depth": float(self.queue.depth()),
            "queue/dropped_stale": float(dropped),
            "queue/dropped_stale_total": float(self.dropped_stale),
            "queue/taken_total": float(self.queue.stats["taken"]),
            "queue/recovered": float(self.recovered),
            "samplers/restarts_total": float(self.pool.restarts),
            **{k: float(np.mean([m[k] for m in metas])) for k in metas[0] if k.startswith("proximal/")},
        }

    def published(self, version: int) -> None:
        del version  # samplers poll the ring buffer themselves

    def checkpointed(self, step: int) -> None:
        self.queue.release(step)

    def close(self) -> None:
        self.pool.close()
