"""Episodes in tau2's own ``Results`` format, and tau2's metrics over them.

The file ``DIR/<domain>.json`` is a ``tau2.data_model.simulation.Results``: tau2's run info
(``tau2.run.get_info``: domain policy, user and agent description, limits), the tasks and one
``SimulationRun`` per episode with its ``reward_info`` from tau2's evaluator, so
``Results.load`` and ``tau2 view`` read it and ``reevaluate`` can score it again.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxrl_async.tau2 import lib as lib_module

USER_IMPLEMENTATIONS = {"scripted": "scripted_user", "solo": "dummy_user", "openai": "user_simulator"}


def make(env, simulations, *, num_trials: int, agent: str, seed: int | None = None, tasks=None):
    """A tau2 ``Results`` of ``simulations`` run on ``env``'s domain and user."""
    lib = lib_module.load()
    remote = env.remote
    info = lib.run.get_info(
        domain=env.domain, agent=("llm_agent_solo" if env.solo else "llm_agent"),
        user=USER_IMPLEMENTATIONS[env.user], llm_agent=agent,
        llm_user=remote.model if remote else None,
        llm_args_user={"api_base": remote.api_base, "temperature": remote.temperature} if remote else None,
        num_trials=num_trials, max_steps=env.max_steps, max_errors=env.max_errors, seed=seed)
    ids = {s.task_id for s in simulations}
    tasks = [t for t in (tasks if tasks is not None else env.tasks) if t.id in ids]
    return lib.simulation.Results(info=info, tasks=tasks, simulations=list(simulations))


def save(results, out_dir: str, domain: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{domain}.json")
    results.save(Path(path))
    return path


def load(path: str):
    return lib_module.load().simulation.Results.load(Path(path))


def reevaluate(results, domain: str, solo: bool) -> list[float]:
    """tau2's evaluator run again on every simulation of ``results`` (its tasks' reward bases)."""
    lib = lib_module.load()
    by_id = {t.id: t for t in results.tasks}
    return [float(lib.evaluate_simulation(simulation=s, task=by_id[s.task_id], evaluation_type=lib.EvaluationType.ALL,
                                          solo_mode=solo, domain=domain).reward) for s in results.simulations]


def summary(rewards_by_task: dict[str, list[float]], trials: int) -> dict:
    """avg@K (mean reward over every trial) and tau2's pass^k for k = 1..K (mean over tasks;
    a trial succeeds when tau2's ``is_successful`` says so)."""
    from tau2.metrics.agent_metrics import is_successful, pass_hat_k

    all_rewards = [r for rs in rewards_by_task.values() for r in rs]
    out = {"avg": sum(all_rewards) / max(1, len(all_rewards))}
    for k in range(1, trials + 1):
        vals = [pass_hat_k(len(rs), sum(is_successful(r) for r in rs), k)
                for rs in rewards_by_task.values() if len(rs) >= k]
        out[f"pass^{k}"] = sum(vals) / max(1, len(vals))
    return out
