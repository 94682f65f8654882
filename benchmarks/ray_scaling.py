"""How the Ray runtime's sampler fleet scales with the number of sampler actors, measured.

    .venv/bin/python -m benchmarks.ray_scaling [--samplers=1,2,3] [--steps=30] [--warmup=5] \
        [--workdir=runs/ray_scaling]

For each fleet size N the script trains the tiny soak config (configs/default.py with a
1-layer width-32 model on `search_easy`, 4 x 4 episodes per step, 2 groups per sampler call,
no warm start, `max_staleness=2`) with `runtime.mode=ray` and N sampler actors of one CPU
each on a local Ray cluster of N CPUs, for `--steps` RL steps, and reads the measurements
from the run's ledgers and metrics over the steps after `--warmup` (compilation and actor
start-up excluded):

- `groups/s made`: new groups the fleet handed to the coordinator per second (put ledger);
- `groups/s per actor`: the same divided by N;
- `learner idle`: the share of the learner's step time spent waiting for groups
  (`perf/learner_wait_s` / `perf/step_s`);
- `episodes/s`: episodes trained per second end to end (learner ledger clock);
- `tokens/s per actor`: the samplers' own decode rate (`rollout/tokens_per_s`, mean).

Ray's CPU count is logical: N actors of one CPU each run on however many cores the machine
has. The table goes to stdout (markdown, with date, machine, load and command) and
everything to WORKDIR/ray_scaling.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time

import numpy as np


def _jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tiny_ray_config(samplers: int, steps: int):
    from jaxrl_async.config import base_config

    c = base_config()  # configs/default.py is base_config() with the task below overridden again
    c.task.name = "search_easy"
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff = 32, 1, 2, 64
    c.rl.groups_per_step, c.rl.group_size = 4, 4
    c.warmstart.enabled = False
    c.runtime.mode = "ray"
    c.runtime.num_samplers = samplers
    c.runtime.sampler_groups = 2
    c.runtime.max_staleness = 2
    c.runtime.ray_num_cpus = 1.0
    c.train.steps = steps
    c.train.eval_every = steps
    c.train.checkpoint_every = steps
    c.eval.episodes = 8
    return c


def measure(samplers: int, steps: int, warmup: int, workdir: str) -> dict:
    """One run with `samplers` actors; the measurements over steps warmup..steps-1."""
    from jaxrl_async.train import train_and_evaluate

    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    c = tiny_ray_config(samplers, steps)
    t0 = time.perf_counter()
    train_and_evaluate(c, workdir, resume=False, progress=False)
    wall = time.perf_counter() - t0
    ledger = os.path.join(workdir, "queue", "ledger")
    takes = {e["step"]: e for e in _jsonl(os.path.join(ledger, "learner.jsonl"))}
    puts = [p for p in _jsonl(os.path.join(ledger, "put-ray-e0.jsonl")) if p["new"]]
    rows = [r for r in _jsonl(os.path.join(workdir, "metrics.jsonl"))
            if "loss/policy" in r and warmup <= r["step"] < steps]
    t_a, t_b = takes[warmup]["t"], takes[steps - 1]["t"]  # when the learner had the batch of each step
    window = t_b - t_a
    made = sum(t_a < p["t"] <= t_b for p in puts)
    episodes = (steps - 1 - warmup) * c.rl.groups_per_step * c.rl.group_size
    wait = float(np.sum([r["perf/learner_wait_s"] for r in rows]))
    step_s = float(np.sum([r["perf/step_s"] for r in rows]))
    return {
        "samplers": samplers, "steps": steps, "warmup": warmup, "wall_s": wall, "window_s": window,
        "groups_made_per_s": made / window, "groups_made_per_s_per_actor": made / window / samplers,
        "learner_idle_frac": wait / step_s, "learner_step_s": step_s / len(rows),
        "episodes_per_s": episodes / window,
        "tokens_per_s_per_actor": float(np.mean([r["rollout/tokens_per_s"] for r in rows])),
        "staleness_mean": float(np.mean([r["staleness/mean"] for r in rows])),
    }


def table(results: list[dict]) -> str:
    lines = ["| sampler actors | groups/s made | groups/s per actor | learner idle | episodes/s end to end "
             "| tokens/s per actor | mean staleness | wall s (run) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['samplers']} | {r['groups_made_per_s']:.2f} | {r['groups_made_per_s_per_actor']:.2f} "
                     f"| {100 * r['learner_idle_frac']:.0f} % | {r['episodes_per_s']:.1f} "
                     f"| {r['tokens_per_s_per_actor']:.0f} | {r['staleness_mean']:.2f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samplers", default="1,2,3", help="comma-separated fleet sizes")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the measurements")
    p.add_argument("--workdir", default="runs/ray_scaling")
    args = p.parse_args(argv)
    if not 0 <= args.warmup < args.steps - 1:
        p.error("--warmup must be below --steps - 1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    header = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
              "load_before": _load(), "command": " ".join([os.path.basename(sys.executable), "-m",
                                                            "benchmarks.ray_scaling", *sys.argv[1:]])}
    results = []
    for n in [int(x) for x in args.samplers.split(",")]:
        results.append(measure(n, args.steps, args.warmup, os.path.join(args.workdir, f"samplers{n}")))
        print(json.dumps(results[-1]), flush=True)
    header["load_after"] = _load()
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "ray_scaling.json"), "w") as f:
        json.dump({**header, "results": results}, f, indent=2)
    print(f"\n{header['date']}; {header['machine']}; load average (1, 5, 15 min) {header['load_before']} before, "
          f"{header['load_after']} after; `{header['command']}`\n")
    print(table(results))


if __name__ == "__main__":
    main()
