"""Supervised warm start on demonstrations of a noisy scripted agent.

RL for language-model agents starts from a fine-tuned model, not from random weights.
Here the fine-tuning data are episodes of each task's scripted agent (`Env.expert_action`)
that takes a plausible wrong action with probability `noise` per turn, so the warm-started
policy is competent at the format but far from reliable, and RL has room to improve it.

`warmstart_params` runs the supervised phase (`run_warmstart`) or takes it from a cache
shared across runs that differ only after the warm start.

Both caches are keyed by everything that shapes what they hold: the demonstrations file in
the workdir by `demonstrations_key` (a fresh run in a reused workdir never trains on another
run's demonstrations), the warm-start cache by `warmstart_key`. `FORMAT_VERSION` is part of
both keys: change it with any change to this module, the scripted agents or the SFT update
that changes what a warm start produces, so that no cache made by older code is served.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxrl_async import config as config_lib
from jaxrl_async.envs.base import Env, expert_episode
from jaxrl_async.learner import update as learner_lib

# The warm start's format: bump it when the code changes what a warm start produces.
FORMAT_VERSION = 2


def _digest(keyed: dict) -> str:
    return hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def demonstrations_key(config, max_len: int) -> str:
    """The key of the demonstrations of `config`: the task, the episode count, the noise, the
    seeds (`seed`, and `eval.seed_offset`, which bounds the task seeds) and the context length."""
    ws = config.warmstart
    return _digest({"format": FORMAT_VERSION, "task": config.task.to_dict(), "episodes": ws.episodes,
                    "noise": ws.noise, "seed": config.seed, "seed_offset": config.eval.seed_offset,
                    "max_len": max_len})


def warmstart_key(config, max_len: int) -> str:
    """The key of the warm-started params of `config`: the demonstrations' key, the model and every
    warm-start setting but `cache_dir`, and the gradient clipping of the SFT optimizer."""
    ws = config.warmstart.to_dict()
    ws.pop("cache_dir")
    return _digest({"demonstrations": demonstrations_key(config, max_len), "model": config.model.to_dict(),
                    "warmstart": ws, "grad_clip": config.optim.grad_clip})


def demonstrations(make_env: Callable[[], Env], task_seeds, noise: float, seed: int,
                   max_len: int) -> dict[str, np.ndarray]:
    """Rolls out the noisy scripted agent once per task seed.

    Returns `tokens` `[N, max_len]` int32 (PAD-padded) and `loss_mask` `[N, max_len]` bool
    marking the agent's tokens (each turn's words and its end-of-turn token), the same
    layout the sampler produces, so the supervised and RL phases see identical contexts.
    A chat env (`envs.chat.ChatEnv`) closes turns with its tokenizer's `eot_id` and is padded with its `pad_id`.
    """
    rng = np.random.default_rng(seed)
    env = make_env()
    n = len(task_seeds)
    tokens = np.full((n, max_len), env.pad_id, np.int32)
    mask = np.zeros((n, max_len), bool)
    for i, task_seed in enumerate(task_seeds):
        ep = expert_episode(env, int(task_seed), rng, noise)
        length = min(len(ep.tokens), max_len)
        tokens[i, :length] = ep.tokens[:length]
        mask[i, :length] = ep.loss_mask[:length]
    return {"tokens": tokens, "loss_mask": mask}


def cached_demonstrations(path: str, key: str, **kwargs) -> dict[str, np.ndarray]:
    """`demonstrations(**kwargs)`, cached as an .npz at `path` (written atomically) under `key`:
    a file holding another key (another run's demonstrations) is replaced."""
    if os.path.exists(path):
        with np.load(path) as f:
            if "key" in f.files and str(f["key"]) == key:
                return {k: f[k] for k in f.files if k != "key"}
    demos = demonstrations(**kwargs)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, key=np.array(key), **demos)
    os.replace(tmp, path)
    return demos


def warmstart_params(config, graphdef, params, model_config, workdir: str, log) -> tuple:
    """The warm-started params and metrics, from `warmstart.cache_dir` when it holds this setting.

    The cache key (`warmstart_key`) covers everything the warm start depends on (task, model,
    warm-start settings, seeds, the format version), so runs that differ only after the warm
    start (routes, runtimes, loss settings) share one warm start.
    """
    cache = config.warmstart.cache_dir
    if not cache:
        return run_warmstart(config, graphdef, params, model_config, workdir, log)
    path = os.path.abspath(os.path.join(cache, warmstart_key(config, model_config.max_len)))
    checkpointer = ocp.StandardCheckpointer()
    if os.path.exists(os.path.join(path, "metrics.json")):
        log(f"warm start: cached in {path}")
        restored = checkpointer.restore(os.path.join(path, "params"), params)
        with open(os.path.join(path, "metrics.json")) as f:
            return restored, json.load(f)
    out, metrics = run_warmstart(config, graphdef, params, model_config, workdir, log)
    os.makedirs(path, exist_ok=True)
    checkpointer.save(os.path.join(path, "params"), out, force=True)
    checkpointer.wait_until_finished()
    with open(os.path.join(path, "metrics.json"), "w") as f:  # written last: marks the entry complete
        json.dump(metrics, f)
    return out, metrics


def run_warmstart(config, graphdef, params, model_config, workdir: str, log) -> tuple:
    """Supervised warm start on cached noisy demonstrations; returns (params, metrics)."""
    ws = config.warmstart
    rng = np.random.default_rng([config.seed, 7])
    seeds = rng.integers(0, config.eval.seed_offset, ws.episodes)
    demos = cached_demonstrations(
        os.path.join(workdir, "demonstrations.npz"), demonstrations_key(config, model_config.max_len),
        make_env=config_lib.env_factory(config), task_seeds=seeds, noise=ws.noise, seed=config.seed,
        max_len=model_config.max_len)
    optimizer = learner_lib.make_optimizer(ws.learning_rate, config.optim.grad_clip)
    state = learner_lib.create_train_state(params, optimizer)
    update = learner_lib.make_sft_update(graphdef, optimizer, model=config_lib.model_module(config))
    t0 = time.perf_counter()
    nll = []
    for i in range(ws.steps):
        idx = rng.integers(0, ws.episodes, ws.batch_size)
        state, m = update(state, {k: jnp.asarray(v[idx]) for k, v in demos.items()})
        nll.append(float(m["sft/nll"]))
        if (i + 1) % 50 == 0 or i + 1 == ws.steps:
            log(f"warm start {i + 1}/{ws.steps}: nll {np.mean(nll[-50:]):.3f}")
    return state.params, {"warmstart/nll_final": float(np.mean(nll[-20:])),
                          "warmstart/wall_s": time.perf_counter() - t0}
