"""What every runtime shares: the `Runtime` protocol, the run's directories, the sampler factory.

A runtime is where a training batch comes from (docs/design.md section 4). Every runtime
hands the learner loop `G` complete groups of `n` trajectories per RL step; its samplers
read weights that the learner publishes after every update (the parameter-version ring
buffer, `runtime.versions.VersionStore`, and the faster routes beside it):

- `inline.InlineRuntime`: sampling in the learner's process on a deterministic schedule.
- `process.ProcessRuntime`: sampler processes generate continuously (`sampler_process`),
  taking weights from the learner's shared-memory slot (`handoff`); the learner takes the
  oldest groups from the spool queue (`spool`).
- `ray_runtime.RayRuntime`: sampler actors on a Ray cluster, weights through Ray's object
  store, groups through a coordinator actor.

The two asynchronous runtimes share one core (`groups`): group keys, the staleness gate and
the learner's `next_groups` loop over a `groups.GroupSource`.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from typing import Optional, Protocol

import jax
import numpy as np

from jaxrl_async import config as config_lib
from jaxrl_async.core.proximal import Route
from jaxrl_async.rollout.sampler import RolloutStats, Sampler
from jaxrl_async.rollout.trajectory import Trajectory
from jaxrl_async.runtime.groups import queue_dir, sampler_batch_metrics  # noqa: F401  (re-exported)
from jaxrl_async.runtime.scorer import LogProbScorer


class Runtime(Protocol):
    """The learner loop's view of a runtime. The loop calls, in order:

    `start(version)` once; then per RL step `next_groups(step, version)` for the batch,
    `published(version + 1)` after the new version is in the ring buffer, and
    `checkpointed(step)` after a checkpoint; `close()` at the end, on success or error.
    """

    bound: int  # staleness bound: no token older than this many versions reaches the loss

    def start(self, version: int) -> None: ...

    def next_groups(self, step: int, version: int) -> tuple[list[Trajectory], dict]:
        """`G * n` trajectories of `G` complete groups (group ids 0..G-1, each `n` times) for
        learner `version`, and the runtime's metrics for this step."""
        ...

    def published(self, version: int) -> None: ...

    def checkpointed(self, step: int) -> None: ...

    def close(self) -> None: ...


def versions_dir(workdir: str) -> str:
    """The parameter-version ring buffer."""
    return os.path.join(workdir, "versions")


def refuse_in_spawn_bootstrap() -> None:
    """Raises RuntimeError in a `multiprocessing` child that is still importing its parent's main
    script. The process runtime starts samplers with 'spawn', which runs the main script again in
    each of them: a script that builds a run at import (no `if __name__ == "__main__":`) would
    start a second run inside every sampler, over the first run's workdir (a fresh run removes its
    queue and versions). Called before a run touches its workdir, so that such a sampler dies at
    once, and the learner fails after a few of these deaths (`sampler_process.STARTUP_DEATHS`)."""
    # CPython's own check for this mistake (multiprocessing.spawn._check_not_importing_main) reads the same flag.
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(
            "a run was started while a multiprocessing child imported the main script: the process runtime's "
            "samplers are started with 'spawn', which imports the main script again in each of them. Start "
            "training under `if __name__ == \"__main__\":` in your script.")


def reset_dirs(workdir: str) -> None:
    """A fresh run in an old workdir: the previous run's versions and queued groups are void."""
    for d in (versions_dir(workdir), queue_dir(workdir)):
        shutil.rmtree(d, ignore_errors=True)


def ring_capacity(config) -> int:
    """Versions the ring buffer keeps: the configured K, or the fewest the runtime needs."""
    if config.runtime.ring_capacity is not None:
        return config.runtime.ring_capacity
    return config_lib.min_ring_capacity(config)


def staleness_bound(config) -> int:
    """The most versions a token may lag the learner: `max_staleness` (process, ray), `lag + 1` (inline)."""
    rt = config.runtime
    return rt.max_staleness if rt.mode in ("process", "ray") else rt.lag + 1


def make_sampler(config, graphdef, workdir: str, warmup_rows: int) -> tuple[Sampler, Optional[LogProbScorer]]:
    """The sampler of the configured proximal route: (Sampler, LogProbScorer or None).

    `interrupt` makes the sampler score in-flight segments under the outgoing version at
    every weight switch; `dedicated` starts an old-log-prob scorer process beside it (reading
    the same ring buffer) that scores each segment as it is generated.
    """
    route = Route(config.proximal.source)
    model_config = config_lib.model_config_from(config)
    scorer = None
    if route == Route.DEDICATED:
        scorer = LogProbScorer().start(versions_dir(workdir), ring_capacity(config), model_config,
                                       config.seed, warmup_rows=warmup_rows)
    sampler = Sampler(graphdef, model_config, config_lib.numerics_from(config), config.sampler.temperature,
                      exact_route=route if route.sampler_side else None, scorer=scorer,
                      prefix_cache=config.sampler.prefix_cache, env_workers=config.sampler.env_workers,
                      mesh=sampler_mesh(config))
    return sampler, scorer


def sampler_mesh(config):
    """The sampler's decode mesh, `(1, 1, sampler.tensor)` over the first devices this process sees; None
    for one device. Raises ValueError naming the field when the process sees fewer devices."""
    t = config.sampler.tensor
    if t == 1:
        return None
    from jaxrl_async.learner import mesh as mesh_lib
    if t > len(jax.devices()):
        raise ValueError(f"config.sampler.tensor = {t} devices, but this process sees {len(jax.devices())}")
    return mesh_lib.make_mesh(data=1, fsdp=1, tensor=t)


def old_logp_metrics(stats: RolloutStats) -> dict:
    """Sampler-side cost of the interrupt and dedicated routes for one generate call."""
    return {"proximal/sampler_stall_s": stats.old_logp_stall_s,
            "proximal/sampler_forward_passes": float(stats.old_logp_forward_passes)}


def generate_sampler_batch(sampler: Sampler, make_env, config, epoch: int, sampler_id: int, batch: int,
                           weight_source, gate_wait_s: float) -> tuple[list[list[Trajectory]], dict]:
    """One generate call of an asynchronous sampler (process or Ray): `runtime.sampler_groups`
    groups of `rl.group_size` episodes from the sampler's current weights.

    Task seeds and the sampling key derive from (seed, epoch, sampler_id, batch) only, so a
    restarted sampler regenerates the same batch. Returns the groups and the metadata every
    group of the batch carries to the learner (`sampler_batch_metrics` reads it).
    """
    n, k = config.rl.group_size, config.runtime.sampler_groups
    rng = np.random.default_rng([config.seed, epoch, sampler_id, batch])
    seeds = rng.integers(0, config.eval.seed_offset, k)
    key = jax.random.key(int(rng.integers(0, 2**31 - 1)))
    trajs, stats = sampler.generate(
        [make_env() for _ in range(k * n)], np.repeat(seeds, n).tolist(), np.repeat(np.arange(k), n).tolist(),
        key, weight_source=weight_source, chunk=config.sampler.chunk, slots=config.sampler.slots or None)
    meta = {"sampler_id": sampler_id, "batch": batch, "tokens_per_s": stats.tokens_per_s,
            "gate_wait_s": gate_wait_s, "sample_s": stats.wall_s, "weight_switches": stats.weight_switches,
            **old_logp_metrics(stats)}
    return [trajs[g * n:(g + 1) * n] for g in range(k)], meta

