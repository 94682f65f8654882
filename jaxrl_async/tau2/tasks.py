"""τ2 domains, their task splits and the tasks an env draws from.

Domains: ``retail`` (114 tasks; splits train 74 / test 40), ``airline`` (50; 30 / 20),
``telecom`` (2285 in ``full``; ``base`` 114, train 74 / test 40, ``small`` 20) and ``mock`` (9, no
splits). ``split="base"`` is the domain's default task set (all tasks where the domain has no
``base`` split). Solo mode keeps the tasks tau2's solo agent accepts (a ticket and gold actions).
"""

from __future__ import annotations

import functools

from jaxrl_async.tau2 import lib as lib_module

DOMAINS = ("retail", "airline", "telecom", "mock")
SOLO_DOMAINS = ("telecom", "mock")


@functools.cache
def splits(domain: str) -> dict[str, list[str]]:
    """The domain's named splits (task ids); {} where it has none."""
    check_domain(domain)
    return dict(lib_module.load().run.load_task_splits(domain) or {})


def check_domain(domain: str, field: str = "task.kwargs.domain") -> None:
    if domain not in DOMAINS:
        raise ValueError(f"{field} must be one of {DOMAINS}; got {domain!r}")


@functools.cache
def load(domain: str, split: str = "base", solo: bool = False) -> tuple:
    """The tasks of ``domain``'s ``split`` (in tau2's order); solo: those valid in solo mode."""
    check_domain(domain)
    lib = lib_module.load()
    named = splits(domain)
    if split in named:
        tasks = lib.run.load_tasks(domain, split)
    elif split == "base" and not named:
        tasks = lib.run.load_tasks(domain)
    else:
        raise ValueError(f"task.kwargs.split must be a split of domain {domain!r} "
                         f"({sorted(named) or ['base']}); got {split!r}")
    if solo:
        if domain not in SOLO_DOMAINS:
            raise ValueError(f"task.kwargs.user='solo' needs a domain with tickets {SOLO_DOMAINS}; got {domain!r}")
        tasks = [t for t in tasks if lib.LLMSoloAgent.check_valid_task(t)]
    if not tasks:
        raise ValueError(f"domain {domain!r} split {split!r} has no tasks{' for solo mode' if solo else ''}")
    return tuple(tasks)
