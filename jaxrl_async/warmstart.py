"""Supervised warm start on demonstrations of a noisy scripted agent.

RL for language-model agents starts from a fine-tuned model, not from random weights.
Here the fine-tuning data are episodes of each task's scripted agent (`Env.expert_action`)
that takes a plausible wrong action with probability `noise` per turn, so the warm-started
policy is competent at the format but far from reliable, and RL has room to improve it.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from jaxrl_async.envs.base import Env, expert_episode
from jaxrl_async.envs.tokenizer import TOKENIZER


def demonstrations(make_env: Callable[[], Env], task_seeds, noise: float, seed: int,
                   max_len: int) -> dict[str, np.ndarray]:
    """Rolls out the noisy scripted agent once per task seed.

    Returns `tokens` `[N, max_len]` int32 (PAD-padded) and `loss_mask` `[N, max_len]` bool
    marking the agent's tokens (each turn's words and its end-of-turn token), the same
    layout the sampler produces, so the supervised and RL phases see identical contexts.
    """
    rng = np.random.default_rng(seed)
    env = make_env()
    n = len(task_seeds)
    tokens = np.full((n, max_len), TOKENIZER.PAD, np.int32)
    mask = np.zeros((n, max_len), bool)
    for i, task_seed in enumerate(task_seeds):
        ep = expert_episode(env, int(task_seed), rng, noise)
        length = min(len(ep.tokens), max_len)
        tokens[i, :length] = ep.tokens[:length]
        mask[i, :length] = ep.loss_mask[:length]
    return {"tokens": tokens, "loss_mask": mask}


def cached_demonstrations(path: str, **kwargs) -> dict[str, np.ndarray]:
    """`demonstrations(**kwargs)`, cached as an .npz at `path` (written atomically)."""
    if os.path.exists(path):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    demos = demonstrations(**kwargs)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **demos)
    os.replace(tmp, path)
    return demos
