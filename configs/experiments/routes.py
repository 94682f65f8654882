"""The route sweep: proximal.source x staleness x sampler numerics x seed (issue 6).

    make experiments        # or: python -m jaxrl_async.experiments.sweep --sweep=configs/experiments/routes.py \
                            #         --out=runs/experiments/routes

Small setting, sized for 2 CPU cores: the default task and model, 64 episodes per RL step
(8 groups of 8), 50 RL steps after the cached warm start, held-out success on 128 episodes
every 5 steps. Every cell uses the inline deterministic runtime, so every route sees the
same schedule. The loss is the default decoupled loss with token-level truncation
(cap 2) and the token rejection band (0.5, 2) on pi_old / mu.

Axes: the exact route `snapshot` stands for all three exact routes in the grid (they give
the same pi_old to 1e-5, tested in tests/test_proximal_routes.py); the second block runs
every route, `dedicated`, `interrupt` and plain `ewma` included, at one setting (staleness
4, bf16), to show the exact routes learn the same and to measure every route's cost.
Staleness s: tokens s and s + 1 versions old (see `experiments.set_staleness`); numerics:
the sampler's dtype (the learner is fp32).
"""

from jaxrl_async.config import base_config
from jaxrl_async.core.proximal import Route

# Plain `ewma` runs only in the second block: on 2 cores the full grid with it did not fit a session.
SOURCES = ("snapshot", "recompute", "bypass", "loglinear", "revised_ewma")
ALL_SOURCES = tuple(r.value for r in Route)  # every proximal.source, exact first
SEEDS = (0, 1, 2)


def get_config():
    c = base_config()
    c.task.name = "tooluse_easy"
    c.rl.groups_per_step = 8
    c.train.steps = 50
    c.train.eval_every = 5
    c.train.checkpoint_every = 25
    c.eval.episodes = 128
    c.sampler.chunk = 8  # partial rollouts: check for new weights every 8 decode steps
    c.runtime.switch_after = 16  # mid-episode switch after 16 decode steps (episodes are about 25 tokens)
    c.loss.token_mask = (0.5, 2.0)
    return c


def get_sweep():
    return [
        {"proximal.source": SOURCES, "staleness": (0, 2, 4, 8), "numerics.dtype": ("fp32", "bf16", "int8"),
         "seed": SEEDS},
        {"proximal.source": ALL_SOURCES, "staleness": (4,), "numerics.dtype": ("bf16",), "seed": SEEDS},
    ]
