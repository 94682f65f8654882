"""τ2-bench costs outside the model (`make bench`, section `tau2`; needs the tau2 package).

Per domain, gold episodes of the first tasks are played through `Tau2Env` (the training path,
shipped tokenizer) and timed:

- reward evaluation per episode: tau2's `evaluate_simulation(..., EvaluationType.ALL)` on the
  finished episode (what the last env step of every episode pays);
- env step per agent turn, without the evaluation: parse, tau2's orchestrator and environment
  (tool calls, the scripted user), the template render and the observation's encoding;
- the prompt length in tokens.

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
