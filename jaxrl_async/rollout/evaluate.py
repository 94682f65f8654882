"""What the rollouts say: held-out evaluation and the rollout metrics of a training batch."""

from __future__ import annotations

import numpy as np

from jaxrl_async import config as config_lib
from jaxrl_async.rollout.sampler import Sampler
from jaxrl_async.rollout.trajectory import Trajectory


class Evaluator:
    """Held-out evaluation of a run: success rate and return on the fixed held-out task seeds
    (`eval.seed_offset + i`, `eval.episodes` of them) in the sampler's numerics.

    One `Sampler` serves every evaluation: its decode loop is compiled per instance, so a new
    sampler per evaluation would trace and compile it again each time.
    """

    def __init__(self, graphdef, model_config, numerics, config):
        self.make_env = config_lib.env_factory(config)
        self.seeds = [config.eval.seed_offset + i for i in range(config.eval.episodes)]
        self.sampler = Sampler(graphdef, model_config, numerics, config.eval.temperature,
                               prefix_cache=config.sampler.prefix_cache,
                               env_workers=config.sampler.env_workers)

    def __call__(self, params, version: int, key) -> dict[str, float]:
        n = len(self.seeds)
        self.sampler.update_params(params, version)
        trajs, _ = self.sampler.generate([self.make_env() for _ in range(n)], self.seeds, list(range(n)), key)
        return {
            "eval/success_rate": float(np.mean([t.success for t in trajs])),
            "eval/return": float(np.mean([t.reward for t in trajs])),
            "eval/turns_mean": float(np.mean([t.num_turns for t in trajs])),
        }


def evaluate(graphdef, model_config, numerics, params, version: int, config, key) -> dict[str, float]:
    """One evaluation of `params` (`Evaluator`); a run evaluating repeatedly keeps one `Evaluator`."""
    return Evaluator(graphdef, model_config, numerics, config)(params, version, key)


def rollout_metrics(trajs: list[Trajectory], version: int, bound: int, task: str = "") -> dict:
    """`rollout/...` and `staleness/...` metrics of one batch of trajectories at learner `version`.

    bound: the runtime's staleness bound (the histogram's last bin). task: `config.task.name`
    (τ2 adds `tau2/user_errors`). Success, return and turns are over the episodes kept:
    a discarded one (`Trajectory.discarded`) is no verdict on the agent, only counted
    (`rollout/discarded`).
    """
    kept = [t for t in trajs if not t.discarded]
    gen_versions = np.concatenate([t.versions[t.loss_mask] for t in trajs])
    staleness = version - gen_versions if gen_versions.size else np.zeros(1, np.int64)
    out = {
        # nan when every episode of the batch was discarded
        "rollout/success_rate": float(np.mean([t.success for t in kept])) if kept else float("nan"),
        "rollout/return_mean": float(np.mean([t.reward for t in kept])) if kept else float("nan"),
        "rollout/episode_tokens_mean": float(np.mean([t.length for t in trajs])),
        "rollout/generated_tokens_mean": float(np.mean([t.loss_mask.sum() for t in trajs])),
        "rollout/turns_mean": float(np.mean([t.num_turns for t in kept])) if kept else float("nan"),
        "rollout/partial_frac": float(np.mean([t.is_partial for t in trajs])),
        "rollout/discarded": float(len(trajs) - len(kept)),
        "staleness/mean": float(staleness.mean()),
        "staleness/max": float(staleness.max()),
        # token counts at staleness 0, 1, ..., bound
        "staleness/hist": np.bincount(np.clip(staleness, 0, bound), minlength=bound + 1).tolist(),
    }
    if task == "tau2":
        out["tau2/user_errors"] = float(sum(t.discarded == "user_error" for t in trajs))
    return out
