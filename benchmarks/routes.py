"""Per-route cost and learning on the default task at a fixed staleness.

Runs `configs/default.py` once per `proximal.source` with the same inline schedule (the
same lag, partial rollouts and sampler numerics), so every route sees the same kind of
data, and prints one table: the cost metrics each route logs and its held-out success
rate. Each run gets its own workdir under `--out` and its own process, so its peak memory
(host RSS, and the accelerator's peak bytes in use where the backend reports them) is its
own; a finished run is read back, not rerun. Timings (`step_s`, `train_s`) are medians over
steps 1.. (the steady state: `snapshot` compiles one forward per row bucket the first time
it meets it; `train_s_mean` in the JSON keeps those compilations); the other columns are
means. `vs_recompute` is a route's `train_s` over that of `recompute`, the usual baseline.

    .venv/bin/python -m benchmarks.routes --steps=100 --lag=2 --numerics=bf16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROUTES = ("snapshot", "dedicated", "interrupt", "recompute", "bypass", "loglinear", "ewma", "revised_ewma")


def _train_one(source: str, args) -> None:
    """Runs one route in this process and records its peak memory in `<workdir>/memory.json`."""
    import jax

    from benchmarks.kernels import peak_rss_mib
    from configs.default import get_config
    from jaxrl_async.train import train_and_evaluate

    workdir = os.path.join(args.out, source)
    c = get_config()
    c.proximal.source = source
    c.train.steps = args.steps
    c.train.eval_every = c.train.checkpoint_every = args.steps
    c.runtime.lag, c.runtime.partial_rollout = args.lag, args.partial
    c.numerics.dtype = args.numerics
    c.seed = args.seed
    c.warmstart.cache_dir = os.path.join(args.out, "warmstart_cache")  # one warm start serves every route
    train_and_evaluate(c, workdir, progress=False)
    stats = jax.devices()[0].memory_stats() or {}  # None on the CPU backend
    with open(os.path.join(workdir, "memory.json"), "w") as f:
        json.dump({"peak_rss_mib": peak_rss_mib(),
                   "peak_device_mib": stats.get("peak_bytes_in_use", float("nan")) / 2**20}, f)


def run_route(source: str, args) -> dict:
    from jaxrl_async.metrics_log import read_metrics

    workdir = os.path.join(args.out, source)
    summary_path = os.path.join(workdir, "summary.json")
    if not os.path.exists(summary_path):
        # Its own process: peak memory is per route, and no route inherits another's caches.
        cmd = [sys.executable, "-m", "benchmarks.routes", f"--only={source}", f"--steps={args.steps}",
               f"--lag={args.lag}", f"--partial={int(args.partial)}", f"--numerics={args.numerics}",
               f"--seed={args.seed}", f"--out={args.out}"]
        subprocess.run(cmd, check=True)
    summary = json.load(open(summary_path))
    memory_path = os.path.join(workdir, "memory.json")
    memory = json.load(open(memory_path)) if os.path.exists(memory_path) else {}
    rows = [r for r in read_metrics(workdir) if "loss/policy" in r][1:]  # step 0 holds the compile

    def mean(key):
        vals = [r[key] for r in rows if key in r]
        return float(np.mean(vals)) if vals else float("nan")

    def median(key):  # timings: the steady state, without the one-off compilations of later steps
        vals = [r[key] for r in rows if key in r]
        return float(np.median(vals)) if vals else float("nan")

    return {
        "route": source,
        "success_start": summary["initial_success_rate"],
        "success_end": summary["final_success_rate"],
        "step_s": median("perf/step_s"),
        "sample_s": median("perf/sample_s"),
        "train_s": median("perf/train_s"),
        "train_s_mean": mean("perf/train_s"),
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
        "peak_rss_mib": memory.get("peak_rss_mib", float("nan")),
        "peak_device_mib": memory.get("peak_device_mib", float("nan")),
    }


def table(results: list[dict]) -> str:
    cols = [("route", "{}"), ("success_start", "{:.3f}"), ("success_end", "{:.3f}"), ("step_s", "{:.3f}"),
            ("train_s", "{:.3f}"), ("forward_passes", "{:.2f}"), ("param_copies", "{:.2f}"),
            ("sampler_stall_s", "{:.4f}"), ("bytes_read", "{:.0f}"), ("is_truncated_frac", "{:.4f}"),
            ("recompute_would_truncate", "{:.4f}"), ("is_weight_max", "{:.3f}"),
            ("clip_frac", "{:.4f}"), ("staleness_mean", "{:.2f}"), ("vs_recompute", "{:.2f}"),
            ("peak_rss_mib", "{:.0f}"), ("peak_device_mib", "{:.0f}")]
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
    p.add_argument("--only", help=argparse.SUPPRESS)  # internal: train this one route in this process
    args = p.parse_args(argv)
    args.partial = bool(args.partial)
    unknown = set(args.routes.split(",")) - set(ROUTES)
    if unknown:
        raise SystemExit(f"error: --routes: unknown {sorted(unknown)}; allowed: {', '.join(ROUTES)}")
    if args.only:
        _train_one(args.only, args)
        return
    from benchmarks.kernels import machine

    t0 = time.perf_counter()
    results = [run_route(r, args) for r in args.routes.split(",")]
    base = {r["route"]: r["train_s"] for r in results}.get("recompute", float("nan"))
    for r in results:
        r["vs_recompute"] = r["train_s"] / base
    header = (f"machine: {machine()}; settings: default config, {args.steps} RL steps, lag {args.lag}, "
              f"partial rollouts {args.partial}, sampler numerics {args.numerics}, seed {args.seed}; "
              f"one process per route (the first one also computes the shared warm start)")
    text = header + "\n\n" + table(results)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "routes.json"), "w") as f:
        json.dump({"settings": vars(args), "results": results, "wall_s": time.perf_counter() - t0}, f, indent=2)
    with open(os.path.join(args.out, "routes.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
