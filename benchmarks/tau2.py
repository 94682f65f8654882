"""τ2-bench costs outside the model (`make bench`, section `tau2`; needs the tau2 package).

Per domain, gold episodes of the first tasks are played through `Tau2Env` (the training path,
shipped tokenizer) and timed:

- reward evaluation per episode: tau2's `evaluate_simulation(..., EvaluationType.ALL)` on the
  finished episode (what the last env step of every episode pays);
- env step per agent turn, without the evaluation: parse, tau2's orchestrator and environment
  (tool calls, the scripted user), the template render and the observation's encoding;
- the prompt length in tokens;
- the shared-prefix KV cache (`prefix_run`): the prompt prefill of 64 episodes with and without
  `Sampler(prefix_cache=True)` (`tau2_tiny`'s model, mock prompts with the scripted user).

    .venv/bin/python -m benchmarks.run --sections=tau2
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

# (domain, tasks timed): the first tasks of the base split.
DOMAINS = (("retail", 10), ("airline", 10), ("telecom", 20), ("mock", 9))


def run(out: str = "runs/bench_tau2.json", domains=DOMAINS) -> list[dict]:
    from jaxrl_async.tau2 import gold
    from jaxrl_async.tau2 import lib as lib_module
    from jaxrl_async.tau2.env import Tau2Env

    lib = lib_module.load()
    rows = []
    for domain, n in domains:
        env = Tau2Env(domain=domain, max_turns=1000, max_context=1 << 30)
        evals, steps, prompts = [], [], []
        for i in range(min(n, len(env.tasks))):
            prompts.append(len(env.reset(i)))
            texts = gold.plan(env, env.task)
            for k in range(len(texts) + 10):
                if env.done:
                    break
                res = env.step(env.encode(texts[min(k, len(texts) - 1)]))
                if not res.done:
                    steps.append(res.info["latency_s"])
            t0 = time.perf_counter()
            lib.evaluate_simulation(simulation=env.simulation, task=env.task, evaluation_type=lib.EvaluationType.ALL,
                                    solo_mode=False, domain=domain)
            evals.append(time.perf_counter() - t0)
        rows.append({"domain": domain, "episodes": len(evals), "eval_s_mean": float(np.mean(evals)),
                     "eval_s_p50": float(np.median(evals)), "step_ms_mean": 1e3 * float(np.mean(steps)),
                     "turns": len(steps) + len(evals), "prompt_tokens_mean": float(np.mean(prompts))})
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(rows, f, indent=2)
    return rows


def print_table(rows: list[dict]) -> None:
    print("τ2: reward evaluation and env steps (gold episodes, shipped tokenizer)")
    print(f"{'domain':<10} {'episodes':>8} {'eval s/ep':>10} {'eval p50':>9} {'step ms/turn':>13} {'prompt tok':>11}")
    for r in rows:
        print(f"{r['domain']:<10} {r['episodes']:>8} {r['eval_s_mean']:>10.3f} {r['eval_s_p50']:>9.3f} "
              f"{r['step_ms_mean']:>13.1f} {r['prompt_tokens_mean']:>11.0f}")


class _Prompt:
    """An episode that is only its (precomputed) prompt: one sampled token ends it, so a generate
    call's time is the prompts' prefill plus one decode step (env resets stay out of the timing)."""

    max_turn_tokens = 1

    def __init__(self, prompt, eot_id, pad_id):
        self.prompt, self.eot_id, self.pad_id = prompt, eot_id, pad_id

    def reset(self, seed):
        return list(self.prompt)

    def step(self, action):
        from jaxrl_async.envs.base import StepResult

        return StepResult(observation=[], reward=0.0, done=True, info={"success": False, "latency_s": 0.0})


def prefix_run(episodes: int = 64, domain: str = "mock", repeats: int = 3,
               out: str = "runs/bench_tau2_prefix.json") -> dict:
    """Prefill seconds of `episodes` τ2 prompts (best of `repeats`, after a compiling call) with and
    without the shared-prefix KV cache. Each timed call loads the weights again, so the prefix is
    prefilled in it (once per version, as in training)."""
    import jax

    from configs import tau2_tiny
    from jaxrl_async import config as config_lib
    from jaxrl_async.rollout.sampler import Sampler
    from jaxrl_async.tau2.env import Tau2Env

    config = tau2_tiny.get_config()
    model_config = config_lib.model_config_from(config)
    graphdef, params = config_lib.init_params(config, model_config)
    env = Tau2Env(config_lib.chat_tokenizer(config), domain=domain, user="scripted", max_context=model_config.max_len)
    prompts = [env.reset(i) for i in range(len(env.tasks))]
    envs = [_Prompt(prompts[i % len(prompts)], env.eot_id, env.pad_id) for i in range(episodes)]
    row = {"domain": domain, "episodes": episodes, "prompt_tokens_mean": float(np.mean([len(p) for p in prompts]))}
    for prefix_cache in (False, True):
        sampler = Sampler(graphdef, model_config, config_lib.numerics_from(config), prefix_cache=prefix_cache)
        times = []
        for r in range(repeats + 1):
            sampler.update_params(params, r)
            t0 = time.perf_counter()
            _, stats = sampler.generate(envs, list(range(episodes)), list(range(episodes)), jax.random.key(0))
            if r:
                times.append(time.perf_counter() - t0)
        name = "with" if prefix_cache else "without"
        row[f"{name}_s"] = min(times)
        row[f"{name}_prefill_tokens"] = stats.prefill_tokens
        if prefix_cache:
            row["prefix_tokens"] = stats.prefix_tokens // max(stats.prefix_hits, 1)
    row["speedup"] = row["without_s"] / row["with_s"]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(row, f, indent=2)
    return row


def print_prefix(row: dict) -> None:
    print(f"τ2: shared-prefix KV cache, prompt prefill of {row['episodes']} {row['domain']} episodes "
          f"(prompts {row['prompt_tokens_mean']:.0f} tokens, shared prefix {row['prefix_tokens']})")
    print(f"without {row['without_s']:.3f} s ({row['without_prefill_tokens']} tokens prefilled)   "
          f"with {row['with_s']:.3f} s ({row['with_prefill_tokens']} tokens prefilled + the prefix once)   "
          f"speedup {row['speedup']:.1f}x")
