"""A seconds-long sweep on a tiny model: what the tests and the notebooks run in CI.

    python -m jaxrl_async.experiments.sweep --sweep=configs/experiments/smoke.py --out=runs/experiments/smoke

The easy search task, a one-layer width-32 model, a short warm start and 6 RL steps:
the numbers show the pipeline works, not how the routes compare (use `routes.py`).
The second block runs every route once, for the cost table of notebook 02.
"""

from jaxrl_async.config import base_config
from jaxrl_async.core.proximal import Route


def get_config():
    c = base_config()
    c.task.name = "search_easy"
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff = 32, 1, 2, 64
    c.rl.groups_per_step, c.rl.group_size = 4, 4
    c.warmstart.episodes, c.warmstart.steps, c.warmstart.batch_size = 128, 40, 32
    c.train.steps = 6
    c.train.eval_every = 3
    c.train.checkpoint_every = 3
    c.eval.episodes = 32
    c.runtime.switch_after = 16  # mid-episode: episodes are about 32 tokens, 12 of them generated
    c.sampler.chunk = 4
    c.loss.token_mask = (0.5, 2.0)
    return c


def get_sweep():
    return [
        {"proximal.source": ("snapshot", "recompute"), "staleness": (0, 2), "numerics.dtype": ("bf16",),
         "seed": (0, 1)},
        {"proximal.source": tuple(r.value for r in Route), "staleness": (2,), "numerics.dtype": ("bf16",),
         "seed": (0,)},
    ]
