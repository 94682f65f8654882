"""Test-wide settings and shared fixtures.

JAX on the CPU, float32, one XLA compilation cache for the session, a deterministic
hypothesis profile; ``tiny_config`` (a factory for a small, fast run config) and
``comparable_metrics`` (metrics rows without timings), shared by the trainer, runtime and
proximal-route tests.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the session, in this process and every process it starts
# (learners, samplers, scorers, sweep cells, notebook kernels): the many short runs of the same tiny
# model compile each program once, not once per run and process. A new, empty directory for every
# session, so a session compiles everything from nothing, as on a fresh CI machine; a
# JAX_COMPILATION_CACHE_DIR set by the caller is used instead. Every compilation is cached: the tiny
# model's take well under JAX's default threshold of a second.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="jaxrl-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

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


def pytest_collection_modifyitems(config, items):
    """Modules with slow tests run first (the order is otherwise kept). `make test` hands whole
    modules to its pytest-xdist workers in this order: the long ones start early, and the run
    ends on short modules instead of one worker finishing a long module while the other idles."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.module.__name__ not in slow)  # a stable sort: False (slow) first
