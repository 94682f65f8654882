"""Test-wide settings and shared fixtures.

JAX on the CPU, float32, a deterministic hypothesis profile; ``tiny_config`` (a factory
for a small, fast run config) and ``comparable_metrics`` (metrics rows without timings),
shared by the trainer, runtime and proximal-route tests.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True)
settings.load_profile("ci")


def _tiny_config(steps=4):
    """A small model on the search task: a few seconds per step on a CPU."""
    # Imported here, not at the top: a broken package import then fails only the tests that use it.
    from jaxrl_async import config as config_lib

    c = config_lib.base_config()
    c.task.name = "search"
    c.task.kwargs.n = 8
    c.task.kwargs.max_turns = 4
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff = 32, 1, 2, 64
    c.rl.groups_per_step, c.rl.group_size = 4, 4
    c.warmstart.episodes, c.warmstart.steps, c.warmstart.batch_size = 64, 5, 16
    c.train.steps = steps
    c.train.eval_every = 2
    c.train.checkpoint_every = 2
    c.eval.episodes = 16
    return c


@pytest.fixture
def tiny_config():
    """Factory: ``tiny_config(steps=4)`` returns a fresh small run config on each call."""
    return _tiny_config


def _comparable_metrics(rows):
    """Metrics rows less their timings: timings differ between runs, everything else must match."""
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "rollout/tokens_per_s"}
            for r in rows]


@pytest.fixture
def comparable_metrics():
    """``comparable_metrics(rows)``: metrics rows without the per-run timing fields."""
    return _comparable_metrics
