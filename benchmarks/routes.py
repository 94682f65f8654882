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

import json
import os
import subprocess
import sys
import time

import numpy as np

from jaxrl_async.core.proximal import Route

ROUTES = tuple(r.value for r in Route)  # every proximal.source, exact first


def _train_one(source: str, settings: dict) -> None:
    """Runs one route in this process and records its peak memory in `<workdir>/memory.json`."""
    import jax

    from benchmarks.kernels import peak_rss_mib
    from configs.default import get_config
    from jaxrl_async.train import train_and_evaluate

    workdir = os.path.join(settings["out"], source)
    c = get_config()
    c.proximal.source = source
    c.train.steps = settings["steps"]
    c.train.eval_every = c.train.checkpoint_every = settings["steps"]
    c.runtime.lag, c.runtime.partial_rollout = settings["lag"], settings["partial"]
    c.numerics.dtype = settings["numerics"]
    c.seed = settings["seed"]
    c.warmstart.cache_dir = os.path.join(settings["out"], "warmstart_cache")  # one warm start serves every route
    train_and_evaluate(c, workdir, progress=False)
    stats = jax.devices()[0].memory_stats() or {}  # None on the CPU backend
    with open(os.path.join(workdir, "memory.json"), "w") as f:
        json.dump({"peak_rss_mib": peak_rss_mib(),
                   "peak_device_mib": stats.get("peak_bytes_in_use", float("nan")) / 2**20}, f)


def run_route(source: str, settings: dict) -> dict:
    from jaxrl_async.metrics_log import read_metrics

    workdir = os.path.join(settings["out"], source)
    summary_path = os.path.join(workdir, "summary.json")
    if not os.path.exists(summary_path):
        # Its own process: peak memory is per route, and no route inherits another's caches.
        cmd = [sys.executable, "-m", "benchmarks.routes", f"--only={source}", f"--steps={settings['steps']}",
               f"--lag={settings['lag']}", f"--partial={int(settings['partial'])}",
               f"--numerics={settings['numerics']}", f"--seed={settings['seed']}", f"--out={settings['out']}"]
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


def run(steps: int = 100, lag: int = 2, partial: bool = True, numerics: str = "bf16", seed: int = 0,
        routes=ROUTES, out: str = "runs/bench_routes") -> list[dict]:
    """Trains (or reads back) each route of `routes`, prints the table, writes routes.json and routes.md."""
    from benchmarks.kernels import machine

    routes = list(routes)
    unknown = set(routes) - set(ROUTES)
    if unknown:
        raise ValueError(f"--routes: unknown {sorted(unknown)}; allowed: {', '.join(ROUTES)}")
    settings = {"steps": steps, "lag": lag, "partial": bool(partial), "numerics": numerics, "seed": seed,
                "routes": ",".join(routes), "out": out, "only": None}
    t0 = time.perf_counter()
    results = [run_route(r, settings) for r in routes]
    base = {r["route"]: r["train_s"] for r in results}.get("recompute", float("nan"))
    for r in results:
        r["vs_recompute"] = r["train_s"] / base
    header = (f"machine: {machine()}; settings: default config, {steps} RL steps, lag {lag}, "
              f"partial rollouts {bool(partial)}, sampler numerics {numerics}, seed {seed}; "
              f"one process per route (the first one also computes the shared warm start)")
    text = header + "\n\n" + table(results)
    print(text)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "routes.json"), "w") as f:
        json.dump({"settings": settings, "results": results, "wall_s": time.perf_counter() - t0}, f, indent=2)
    with open(os.path.join(out, "routes.md"), "w") as f:
        f.write(text + "\n")
    return results


def main(argv):
    """`python -m benchmarks.routes`: the flags are defined below, in `__main__`."""
    from absl import app, flags, logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    if FLAGS.only:  # internal: one route's training run, in this process
        if FLAGS.only not in ROUTES:
            raise app.UsageError(f"--only: unknown route {FLAGS.only!r}; allowed: {', '.join(ROUTES)}")
        _train_one(FLAGS.only, {"steps": FLAGS.steps, "lag": FLAGS.lag, "partial": bool(FLAGS.partial),
                                "numerics": FLAGS.numerics, "seed": FLAGS.seed, "out": FLAGS.out})
        return
    try:
        run(FLAGS.steps, FLAGS.lag, bool(FLAGS.partial), FLAGS.numerics, FLAGS.seed, FLAGS.routes, FLAGS.out)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_integer("steps", 100, "RL steps per route.", lower_bound=1)
    flags.DEFINE_integer("lag", 2, "Inline runtime lag: the sampler's weights are this many versions old.",
                         lower_bound=0)
    flags.DEFINE_integer("partial", 1, "1: partial rollouts (mid-episode weight switch); 0: off.")
    flags.DEFINE_string("numerics", "bf16", "Sampler numerics (config.numerics.dtype).")
    flags.DEFINE_integer("seed", 0, "Config seed.")
    flags.DEFINE_list("routes", list(ROUTES), "Comma-separated proximal.source values to run.")
    flags.DEFINE_string("out", "runs/bench_routes", "One workdir per route, routes.json and routes.md go here.")
    flags.DEFINE_string("only", None, "Internal: train this one route in this process.")
    app.run(main)
