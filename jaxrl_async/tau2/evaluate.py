"""Evaluation of a policy on a τ2 domain: K trials per task through the sampler, tau2's metrics.

``evaluate(config, trials=K, out=DIR, ...)`` plays every task of the split K times with the
config's model (``model.checkpoint``'s weights, or a training run's latest parameter version
with ``workdir``), user (``task.kwargs.user``), ``eval.temperature`` and ``sampler.slots``, and
writes ``DIR/<domain>.json`` in tau2's ``Results`` format (one ``SimulationRun`` per trial, its
reward from tau2's evaluator). An episode the sampler cut at the context ends as tau2's
``max_steps`` (reward 0); an episode whose user simulator failed is left out and counted.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from jaxrl_async.tau2 import results


@dataclasses.dataclass
class Report:
    domain: str
    trials: int
    rewards: dict  # task id -> rewards of its kept trials
    summary: dict  # avg, pass^1..pass^K
    path: str
    user_errors: int
    wall_s: float

    def table(self) -> str:
        lines = [f"{'task':<50} {'trials':>6} {'mean reward':>11}"]
        for task_id, rs in self.rewards.items():
            lines.append(f"{task_id:<50} {len(rs):>6} {np.mean(rs) if rs else float('nan'):>11.3f}")
        kept = sum(len(r) for r in self.rewards.values())
        lines.append(f"wrote {self.path} ({kept} episodes, {self.user_errors} discarded for user-simulator "
                     f"errors, {self.wall_s:.1f} s)")
        lines.append(f"{self.domain}: avg@{self.trials} {self.summary['avg']:.4f} " + " ".join(
            f"pass^{k} {self.summary[f'pass^{k}']:.4f}" for k in range(1, self.trials + 1)))
        return "\n".join(lines)


def evaluate(config, *, trials: int, out: str, domain: str | None = None, split: str | None = None,
             workdir: str | None = None, seed: int = 0, task_ids=None) -> Report:
    import jax

    from jaxrl_async import config as config_lib
    from jaxrl_async.rollout.sampler import Sampler
    from jaxrl_async.runtime import base as runtime_base
    from jaxrl_async.runtime.versions import VersionStore
    from jaxrl_async.tau2.env import Tau2Env

    config = config.copy_and_resolve_references()
    if config.task.name != "tau2":
        raise ValueError(f"config.task.name must be 'tau2'; got {config.task.name!r}")
    if domain:
        config.task.kwargs.domain = domain
    if split:
        config.task.kwargs.split = split
    config_lib.validate(config)
    model_config = config_lib.model_config_from(config)
    graphdef, params = config_lib.init_params(config, model_config)
    version = 0
    if workdir:
        store = VersionStore(runtime_base.versions_dir(workdir), runtime_base.ring_capacity(config), params)
        if store.latest_version() is None:
            raise ValueError(f"workdir {workdir!r}: no parameter version under {runtime_base.versions_dir(workdir)}")
        version, params = store.get_latest()
    kwargs = config.task.kwargs.to_dict()
    kwargs.setdefault("max_context", config.model.max_len)
    if task_ids:
        kwargs["task_ids"] = list(task_ids)
    tokenizer = config_lib.chat_tokenizer(config)
    probe = Tau2Env(tokenizer, **kwargs)
    n = len(probe.tasks)
    envs = [Tau2Env(tokenizer, **kwargs) for _ in range(n * trials)]
    seeds = [i for i in range(n) for _ in range(trials)]
    sampler = Sampler(graphdef, model_config, config_lib.numerics_from(config), config.eval.temperature)
    sampler.update_params(params, version)
    t0 = time.perf_counter()
    sampler.generate(envs, seeds, seeds, jax.random.PRNGKey(seed), chunk=config.sampler.chunk,
                     slots=config.sampler.slots or None)
    sims, rewards, user_errors = [], {t.id: [] for t in probe.tasks}, 0
    for j, env in enumerate(envs):
        sim = env.simulation if env.done else env.abandon()
        if env.user_errors:
            user_errors += 1
            continue
        sim.trial = j % trials
        sims.append(sim)
        rewards[sim.task_id].append(float(sim.reward_info.reward))
    agent = config.model.checkpoint or workdir or "random-init"
    res = results.make(probe, sims, num_trials=trials, agent=agent, seed=seed)
    path = results.save(res, out, probe.domain)
    return Report(probe.domain, trials, rewards, results.summary(rewards, trials), path, user_errors,
                  time.perf_counter() - t0)
