"""Experiment sweeps: expand a grid of configs, run every cell once, collect tidy tables.

    python -m jaxrl_async.experiments --sweep=configs/experiments/routes.py \
        --out=runs/experiments/routes --workers=2

A sweep file (see `configs/experiments/`) defines `get_config()`, the base config, and
`get_sweep()`, a list of blocks; each block maps an axis to its values and the block's
cells are the product of its axes (duplicate cells across blocks run once). An axis is a
config field (`"proximal.source"`, `"loss.is_cap"`, ...) or `"staleness"`, which sets the
inline schedule (see `set_staleness`).

Each cell runs `train.train_and_evaluate` in its own subprocess and workdir under
`<out>/cells/<cell id>`, so one crashed cell never takes the sweep down (its log is in
`<cell>/log.txt`), and a rerun skips finished cells (those with a `summary.json`) and
resumes unfinished ones from their last checkpoint. Warm starts are shared through
`warmstart.cache_dir` and computed once per distinct setting before the cells start,
and XLA compilations are shared through JAX's persistent compilation cache.

Outputs in `<out>`: `runs.csv` (one row per run: its axes, summary results, per-step
means of the loss and cost metrics, and the full config as JSON), `curves.csv` (one row
per run and evaluation: held-out success against step and against cumulative learner
wall-clock), and `sweep.json` (the cells and settings).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time

import numpy as np

# Per-step metrics whose mean over the run (compile step excluded) goes into runs.csv.
MEAN_METRICS = (
    "ratio/clip_frac", "ratio/effective_clip_frac", "is/truncated_frac", "is/weight_max", "is/ess",
    "mask/token_frac", "mask/kept_frac", "mismatch/kl_k1", "staleness/kl", "staleness/mean",
    "audit/exact/is/truncated_frac", "audit/exact/mask/token_frac",
    "audit/recompute/is/truncated_frac", "audit/recompute/mask/token_frac",
    "proximal/forward_passes", "proximal/param_copies", "proximal/sampler_stall_s", "proximal/ewma_beta",
    "rollout/success_rate", "rollout/partial_frac",
    "perf/step_s", "perf/sample_s", "perf/train_s",
)


def load_sweep(path: str):
    """The sweep module at `path` (a file with `get_config()` and `get_sweep()`)."""
    spec = importlib.util.spec_from_file_location(f"sweep_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for fn in ("get_config", "get_sweep"):
        if not hasattr(module, fn):
            raise ValueError(f"sweep file {path!r} must define {fn}()")
    return module


def set_staleness(config, s: int) -> None:
    """Staleness `s` of the inline schedule: `s = 0` is on-policy; `s > 0` samples with the
    weights of `s` versions ago and switches weights mid-episode (partial rollouts), so a
    batch holds tokens `s` and `s + 1` versions old, as an asynchronous sampler would."""
    if not (isinstance(s, int) and s >= 0):
        raise ValueError(f"sweep axis 'staleness' takes integers >= 0; got {s!r}")
    config.runtime.lag = s
    config.runtime.partial_rollout = s > 0


def _set(config, axis: str, value) -> None:
    if axis == "staleness":
        set_staleness(config, value)
        return
    *parents, leaf = axis.split(".")
    node = config
    for p in parents:
        if p not in node:
            raise ValueError(f"sweep axis {axis!r} is not a config field")
        node = node[p]
    if leaf not in node:
        raise ValueError(f"sweep axis {axis!r} is not a config field")
    node[leaf] = tuple(value) if isinstance(value, list) else value


def _fmt(value) -> str:
    if isinstance(value, (tuple, list)):
        return "-".join(_fmt(v) for v in value)
    return str(value)


def cell_id(overrides: dict) -> str:
    """A readable, filesystem-safe name of a cell, e.g. `source=snapshot__staleness=4__dtype=bf16__seed=0`."""
    return "__".join(f"{axis.split('.')[-1]}={_fmt(v)}" for axis, v in overrides.items())


def expand(sweep) -> list[tuple[str, dict]]:
    """[(cell id, {axis: value})] over the blocks of `sweep.get_sweep()`, duplicates removed."""
    cells, seen = [], set()
    for block in sweep.get_sweep():
        axes = list(block)
        for values in itertools.product(*(block[a] for a in axes)):
            overrides = dict(zip(axes, values))
            cid = cell_id(overrides)
            if cid not in seen:
                seen.add(cid)
                cells.append((cid, overrides))
    return cells


def cell_config(sweep, overrides: dict, warmstart_cache: str):
    """The validated config of one cell."""
    from jaxrl_async import config as config_lib

    c = sweep.get_config()
    for axis, value in overrides.items():
        _set(c, axis, value)
    if warmstart_cache and not c.warmstart.cache_dir:
        c.warmstart.cache_dir = os.path.abspath(warmstart_cache)
    config_lib.validate(c)
    return c


def _cell_main(args) -> None:
    """Subprocess entry: run one cell (or only its warm start) and exit."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from jaxrl_async import train

    sweep = load_sweep(args.sweep)
    overrides = dict(expand(sweep))[args.cell]
    config = cell_config(sweep, overrides, args.warmstart_cache)
    workdir = os.path.join(args.out, "cells", args.cell)
    if args.warmstart_only:
        from jaxrl_async import model as model_lib

        os.makedirs(workdir, exist_ok=True)
        model_config = train.model_config_from(config)
        graphdef, params = model_lib.init_model(model_config, config.seed)
        train.warmstart_params(config, graphdef, params, model_config, workdir, print)
    else:
        train.train_and_evaluate(config, workdir, resume=True, progress=False)


def _launch(args, cid: str, core: int | None, warmstart_only: bool) -> subprocess.Popen:
    workdir = os.path.join(args.out, "cells", cid)
    os.makedirs(workdir, exist_ok=True)
    env = dict(os.environ)
    # Compilations are the same in every cell: share them across processes.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(os.path.join(args.out, "..", "jax_cache")))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    cmd = [sys.executable, "-m", "jaxrl_async.experiments", "--sweep", args.sweep, "--out", args.out,
           "--warmstart_cache", args.warmstart_cache, "--cell", cid] + (["--warmstart_only"] if warmstart_only else [])
    log = open(os.path.join(workdir, "warmstart_log.txt" if warmstart_only else "log.txt"), "a")
    # One core per worker: the tiny models do not gain from threads, and pinning keeps
    # concurrent cells from stealing each other's time slices.
    preexec = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec)


def _run_pool(args, jobs: list[tuple[str, bool]], label: str) -> list[str]:
    """Runs `(cell id, warmstart_only)` jobs on `args.workers` pinned workers; returns the failed ids."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    slots = [cores[i % len(cores)] if cores and args.workers > 1 else None for i in range(args.workers)]
    pending, running, failed, done = list(jobs), {}, [], 0
    t0 = time.perf_counter()
    while pending or running:
        for slot in range(args.workers):
            if slot not in running and pending:
                cid, ws = pending.pop(0)
                running[slot] = (cid, _launch(args, cid, slots[slot], ws))
        time.sleep(0.2)
        for slot, (cid, proc) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[slot]
            done += 1
            if proc.returncode != 0:
                failed.append(cid)
            print(f"[{label} {done}/{len(jobs)} {time.perf_counter() - t0:.0f}s] {cid}: "
                  f"{'ok' if proc.returncode == 0 else f'FAILED (exit {proc.returncode}), see its log.txt'}",
                  flush=True)
    return failed


def run_sweep(args) -> dict:
    """Runs the unfinished cells of the sweep; returns {'cells', 'ran', 'skipped', 'failed'}."""
    sweep = load_sweep(args.sweep)
    cells = expand(sweep)
    for cid, overrides in cells:  # every cell's config validates before anything runs
        try:
            cell_config(sweep, overrides, args.warmstart_cache)
        except ValueError as e:
            raise SystemExit(f"error: sweep cell {cid}: {e}") from None
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump({"sweep": args.sweep, "cells": dict(cells), "workers": args.workers}, f, indent=2)
    todo = [(cid, ov) for cid, ov in cells if not os.path.exists(os.path.join(args.out, "cells", cid, "summary.json"))]
    # Seed-major order: an interrupted sweep leaves whole seeds complete rather than whole routes.
    todo.sort(key=lambda c: (c[1].get("seed", 0),))
    print(f"sweep {args.sweep}: {len(cells)} cells, {len(cells) - len(todo)} finished, {len(todo)} to run "
          f"on {args.workers} worker(s)", flush=True)
    failed = []
    if todo:
        # One warm start per distinct setting, before the cells, so no two cells race to fill the cache.
        keys = {}
        for cid, ov in todo:
            c = cell_config(sweep, ov, args.warmstart_cache)
            if c.warmstart.enabled:
                keys.setdefault(json.dumps([c.seed, c.task.to_dict(), c.model.to_dict(), c.warmstart.to_dict()],
                                           sort_keys=True, default=str), cid)
        failed += _run_pool(args, [(cid, True) for cid in keys.values()], "warm start")
        failed += _run_pool(args, [(cid, False) for cid, _ in todo if cid not in failed], "cell")
    collect(args.out, cells)
    return {"cells": len(cells), "ran": len(todo), "skipped": len(cells) - len(todo), "failed": failed}


def _axis_columns(overrides: dict) -> dict:
    return {axis.split(".")[-1]: _fmt(v) for axis, v in overrides.items()}


def collect(out: str, cells: list[tuple[str, dict]]) -> tuple[list[dict], list[dict]]:
    """Writes `runs.csv` and `curves.csv` from the finished cells; returns their rows."""
    from jaxrl_async.metrics_log import read_metrics

    runs, curves = [], []
    for cid, overrides in cells:
        workdir = os.path.join(out, "cells", cid)
        path = os.path.join(workdir, "summary.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            summary = json.load(f)
        rows = read_metrics(workdir)
        steps = [r for r in rows if "loss/policy" in r]
        step_s = {r["step"]: r["perf/step_s"] for r in steps}
        if len(step_s) > 1:  # the first step of a (re)start holds the compilations: count it as a typical step
            step_s[min(step_s)] = float(np.median([v for s, v in step_s.items() if s != min(step_s)]))
        run = {"cell": cid, **_axis_columns(overrides),
               "success_start": summary["initial_success_rate"], "success_final": summary["final_success_rate"],
               "success_best": summary["best_success_rate"], "steps": summary["steps"],
               "wall_s": summary["wall_seconds"], "learner_wall_s": float(sum(step_s.values()))}
        for key in MEAN_METRICS:
            vals = [r[key] for r in steps[1:] if key in r]  # steps[0] holds the compilations
            run[key] = float(np.mean(vals)) if vals else float("nan")
        run["config"] = json.dumps(summary["config"], sort_keys=True)
        runs.append(run)
        for r in rows:
            if "eval/success_rate" in r:
                # Learner wall-clock up to this evaluation: the RL steps before it, evaluation excluded.
                wall = float(sum(v for s, v in step_s.items() if s < r["step"]))
                curves.append({"cell": cid, **_axis_columns(overrides), "step": r["step"],
                               "success": r["eval/success_rate"], "learner_wall_s": wall})
    for name, table in (("runs.csv", runs), ("curves.csv", curves)):
        if table:
            with open(os.path.join(out, name), "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(table[0]))
                writer.writeheader()
                writer.writerows(table)
    return runs, curves


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", required=True, help="sweep file with get_config() and get_sweep()")
    p.add_argument("--out", required=True, help="output directory (cells, runs.csv, curves.csv)")
    p.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                   help="cells run at once, one pinned core each")
    p.add_argument("--warmstart_cache", default="runs/experiments/warmstart_cache",
                   help="warm-start cache shared by every cell and sweep")
    p.add_argument("--collect_only", action="store_true", help="only rebuild runs.csv and curves.csv")
    p.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run this one cell
    p.add_argument("--warmstart_only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.workers < 1:
        raise SystemExit(f"error: --workers must be >= 1; got {args.workers}")
    if args.cell:
        _cell_main(args)
        return
    if args.collect_only:
        collect(args.out, expand(load_sweep(args.sweep)))
        return
    result = run_sweep(args)
    print(f"{result['ran']} cells run, {result['skipped']} skipped (finished before); results in "
          f"{args.out}/runs.csv and {args.out}/curves.csv")
    if result["failed"]:
        raise SystemExit(f"error: {len(result['failed'])} cell(s) failed: {result['failed']}")


if __name__ == "__main__":
    main()
