"""Multi-turn tool-using agent tasks behind one small interface (see ``base.Env``).

``make_env(name, **kwargs)`` builds a task by name; kwargs override the registered
defaults (difficulty, turn budget, simulated latency). Names:

* ``search``        locate a hidden number in [0, 16) with ``guess K`` (6 turns)
* ``search_easy``   the same in [0, 8) (5 turns), for fast end-to-end tests
* ``tooluse``       lookup -> amount -> refund with a distractor order (5 turns)
* ``tooluse_easy``  the same with one order and numbers below 20 (5 turns)
"""

from __future__ import annotations

from jaxrl_async.envs.base import ERROR_MESSAGES, Env, Episode, StepResult, expert_episode
from jaxrl_async.envs.search import SearchEnv
from jaxrl_async.envs.tokenizer import TOKENIZER, Tokenizer
from jaxrl_async.envs.tooluse import ToolUseEnv

# name -> (class, default kwargs)
_REGISTRY: dict[str, tuple[type[Env], dict]] = {
    "search": (SearchEnv, {}),
    "search_easy": (SearchEnv, {"n": 8, "max_turns": 5}),
    "tooluse": (ToolUseEnv, {}),
    "tooluse_easy": (ToolUseEnv, {"num_orders": 1, "max_value": 20}),
}

ENV_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def make_env(name: str, **kwargs) -> Env:
    """Builds the task ``name``; ``kwargs`` override its registered defaults."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown env {name!r}; allowed names: {', '.join(ENV_NAMES)}")
    cls, defaults = _REGISTRY[name]
    env = cls(**{**defaults, **kwargs})
    env.name = name
    return env


__all__ = [
    "ENV_NAMES",
    "ERROR_MESSAGES",
    "Env",
    "Episode",
    "SearchEnv",
    "StepResult",
    "TOKENIZER",
    "Tokenizer",
    "ToolUseEnv",
    "expert_episode",
    "make_env",
]
