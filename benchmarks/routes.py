"""Per-route cost and learning on the default task at a fixed staleness.

Runs `configs/default.py` once per `proximal.source` with the same inline schedule (the
same lag, partial rollouts and sampler numerics), so every route sees the same kind of
data, and prints one table: the cost metrics each route logs and its held-out success
rate. Each run gets its own workdir under `--out`; a finished run is read back, not rerun.

    .venv/bin/python -m benchmarks.routes --steps=100 --lag=2 --numerics=bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

ROUTES = ("snapshot", "dedicated", "interrupt", "recompute", "bypass", "loglinear", "ewma", "revised_ewma")


def run_route(source: str, args) -> dict:
    from configs.default import get_config
    from jaxrl_async.metrics_log import read_metrics
    from jaxrl_async.train import train_and_evaluate

    workdir = os.path.join(args.out, source)
    summary_path = os.path.join(workdir, "summary.json")
    if not os.path.exists(summary_path):
        c = get_config()
        c.proximal.source = source
        c.train.steps = args.steps
        c.train.eval_every = c.train.checkpoint_every = args.steps
        c.runtime.lag, c.runtime.partial_rollout = args.lag, args.partial
        c.numerics.dtype = args.numerics
        c.seed = args.seed
        c.warmstart.cache_dir = os.path.join(args.out, "warmstart_cache")  # one warm start serves every route
        train_and_evaluate(c, workdir, progress=False)
    summary = json.load(open(summary_path))
    rows = [r for r in read_metrics(workdir) if "loss/policy" in r][1:]  # step 0 holds the compile

    def mean(key):
        vals = [r[key] for r in rows if key in r]
        return float(np.mean(vals)) if vals else float("nan")

    return {
        "route": source,
        "success_start": summary["initial_success_rate"],
        "success_end": summary["final_success_rate"],
        "step_s": mean("perf/step_s"),
        "sample_s": mean("perf/sample_s"),
        "train_s": mean("perf/train_s"),
        "forward_passes": mean("proximal/forward_passes"),
        "param_copies": mean("proximal/param_copies"),
        "sampler_stall_s": mean("proximal/sampler_stall_s"),
        "bytes_read": mean("proximal/bytes_read"),
        "is_truncated_frac": mean("is/truncated_frac"),
        "recompute_would_truncate": mean("audit/recompute/is/truncated_frac"),
        "is_weight_max": mean("is/weight_max"),
        "clip_frac": mean("ratio/clip_frac"),
        "staleness_mean": mean("staleness/mean"),
        "wall_s": summary["wall_seconds"],
    }


def table(results: list[dict]) -> str:
    cols = [("route", "{}"), ("success_start", "{:.3f}"), ("success_end", "{:.3f}"), ("step_s", "{:.3f}"),
            ("train_s", "{:.3f}"), ("forward_passes", "{:.2f}"), ("param_copies", "{:.2f}"),
            ("sampler_stall_s", "{:.4f}"), ("bytes_read", "{:.0f}"), ("is_truncated_frac", "{:.4f}"),
            ("recompute_would_truncate", "{:.4f}"), ("is_weight_max", "{:.3f}"),
            ("clip_frac", "{:.4f}"), ("staleness_mean", "{:.2f}")]
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        lines.append("| " + " | ".join("n/a" if isinstance(r[c], float) and np.isnan(r[c]) else f.format(r[c])
                                       for c, f in cols) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lag", type=int, default=2)
    p.add_argument("--partial", type=int, default=1, help="1: partial rollouts (mid-episode weight switch)")
    p.add_argument("--numerics", default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--routes", default=",".join(ROUTES))
    p.add_argument("--out", default="runs/bench_routes")
    args = p.parse_args(argv)
    args.partial = bool(args.partial)
    t0 = time.perf_counter()
    results = [run_route(r, args) for r in args.routes.split(",")]
    header = (f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or 'cpu'}; "
              f"jax backend cpu; settings: default config, {args.steps} RL steps, lag {args.lag}, "
              f"partial rollouts {args.partial}, sampler numerics {args.numerics}, seed {args.seed}")
    text = header + "\n\n" + table(results)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "routes.json"), "w") as f:
        json.dump({"settings": vars(args), "results": results, "wall_s": time.perf_counter() - t0}, f, indent=2)
    with open(os.path.join(args.out, "routes.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
