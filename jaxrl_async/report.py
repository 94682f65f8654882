"""Tables and figures from the experiment tables (`runs.csv`, `curves.csv` of a sweep).

    python -m jaxrl_async.report --routes=runs/experiments/routes \
        --thresholds=runs/experiments/thresholds --out=runs/experiments/report

Prints markdown tables (and writes them to `<out>/report.md`) and figures (PNG) that
answer the questions of the route sweep: the entanglement of staleness and mismatch
under `recompute`, the interaction with the loss thresholds, learning against steps and
against learner wall-clock per route, steps to a target success rate, and per-route
cost. Every number is a mean over seeds with its spread (std over seeds, `n` seeds).
Plain numpy and csv, no dataframe library, so the notebooks need nothing extra.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections import defaultdict

import numpy as np

ROUTE_ORDER = ("snapshot", "dedicated", "interrupt", "recompute", "bypass", "loglinear", "ewma", "revised_ewma")
AXES = ("source", "staleness", "dtype", "seed", "is_cap", "token_mask")


def read_table(path: str) -> list[dict]:
    """Rows of a CSV written by `experiments.collect`; numeric columns become floats (axes stay strings)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k in AXES or k in ("cell", "config"):
                continue
            try:
                r[k] = float(v)
            except (TypeError, ValueError):
                pass
    return rows


# The tables of the sweeps behind the README's results, committed so the notebooks can read
# them on a fresh checkout without the hour-long `make experiments`.
COMMITTED_RESULTS = "docs/results"


def results_dir(name: str, env_var: str | None = None) -> str | None:
    """Where the tables (`runs.csv`) of sweep `name` ("routes", "thresholds") are.

    `$env_var` when it is set and non-empty (used as given: no fallback when it holds no
    `runs.csv`); else `runs/experiments/<name>` (your own `make experiments`); else the
    committed `docs/results/<name>`. Relative to the repository root; None if none of the
    places consulted has a `runs.csv`.
    """
    if env_var and os.environ.get(env_var):
        candidates = [os.environ[env_var]]
    else:
        candidates = [os.path.join("runs", "experiments", name), os.path.join(COMMITTED_RESULTS, name)]
    return next((d for d in candidates if os.path.exists(os.path.join(d, "runs.csv"))), None)


def load(results_dir: str) -> tuple[list[dict], list[dict]]:
    """(runs, curves) of one sweep's output directory."""
    return read_table(os.path.join(results_dir, "runs.csv")), read_table(os.path.join(results_dir, "curves.csv"))


def select(rows: list[dict], **where) -> list[dict]:
    """Rows whose columns equal `where` (compared as strings, so `staleness=4` works)."""
    return [r for r in rows if all(str(r.get(k)) == str(v) for k, v in where.items())]


def mean_std(values) -> tuple[float, float, int]:
    """(mean, std over seeds, n) of the finite values; nan when there are none."""
    v = np.asarray([x for x in values if np.isfinite(x)], float)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def fmt(m: float, s: float | None = None, n: int | None = None, pct: bool = False, digits: int = 2) -> str:
    if not np.isfinite(m):
        return "n/a"
    scale, unit = (100.0, "%") if pct else (1.0, "")
    text = f"{m * scale:.{digits}f}{unit}"
    if s is not None and np.isfinite(s):
        text += f" ± {s * scale:.{digits}f}"
    return text


def routes_in(rows) -> list[str]:
    present = {r["source"] for r in rows}
    return [s for s in ROUTE_ORDER if s in present]


def staleness_in(rows) -> list[str]:
    return sorted({r["staleness"] for r in rows}, key=int)


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def steps_to_target(curve: list[dict], target: float, x: str = "step") -> float:
    """First `x` (step or learner_wall_s) at which held-out success reaches `target`, linearly
    interpolated between evaluations; nan if the run never reaches it."""
    pts = sorted(curve, key=lambda r: r["step"])
    for prev, cur in zip(pts, pts[1:]):
        if cur["success"] >= target:
            if prev["success"] >= target:
                return float(prev[x])
            frac = (target - prev["success"]) / (cur["success"] - prev["success"])
            return float(prev[x] + frac * (cur[x] - prev[x]))
    return float(pts[0][x]) if pts and pts[0]["success"] >= target else float("nan")


def by_cell(curves: list[dict]) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for r in curves:
        out[r["cell"]].append(r)
    return out


def entanglement_table(runs: list[dict], dtype: str) -> str:
    """Discrepancy truncation and token-rejection fractions against staleness, per route.

    `snapshot (as recompute)` is the audit the exact route logs on its own batches: what
    `recompute` would have truncated and rejected on exactly the same data.
    """
    rows = select(runs, dtype=dtype)
    sources = [s for s in routes_in(rows) if s in ("snapshot", "recompute", "bypass", "loglinear", "ewma",
                                                    "revised_ewma")]
    header = ["staleness"] + [f"{s} trunc / mask" for s in sources] + ["snapshot (as recompute) trunc / mask"]
    body = []
    for st in staleness_in(rows):
        line = [st]
        for s in sources:
            sel = select(rows, source=s, staleness=st)
            t, m = (mean_std([r[k] for r in sel])[0] for k in ("is/truncated_frac", "mask/token_frac"))
            line.append(f"{fmt(t, pct=True)} / {fmt(m, pct=True)}")
        sel = select(rows, source="snapshot", staleness=st)
        t, m = (mean_std([r[k] for r in sel])[0]
                for k in ("audit/recompute/is/truncated_frac", "audit/recompute/mask/token_frac"))
        line.append(f"{fmt(t, pct=True)} / {fmt(m, pct=True)}")
        body.append(line)
    return markdown(header, body)


def metric_table(runs: list[dict], dtype: str, key: str, pct: bool = True) -> str:
    """One per-step metric (run mean, then mean ± std over seeds) per route and staleness."""
    rows = select(runs, dtype=dtype)
    stal = staleness_in(rows)
    body = []
    for src in routes_in(rows):
        line = [src]
        for st in stal:
            sel = select(rows, source=src, staleness=st)
            line.append(fmt(*mean_std([r[key] for r in sel])[:2], pct=pct) if sel else "n/a")
        body.append(line)
    return markdown(["route"] + [f"s={s}" for s in stal], body)


def learning_table(runs: list[dict], curves: list[dict], dtype: str, target: float) -> str:
    """Per route and staleness: final held-out success, steps and learner seconds to `target`."""
    rows = select(runs, dtype=dtype)
    cells = by_cell(curves)
    stal = staleness_in(rows)
    header = ["route"] + [f"s={s}: final success" for s in stal] + [f"s={s}: steps / s to {target:g}" for s in stal]
    body = []
    for src in routes_in(rows):
        finals, reach = [], []
        for st in stal:
            sel = select(rows, source=src, staleness=st)
            finals.append(fmt(*mean_std([r["success_final"] for r in sel])[:2]))
            steps = [steps_to_target(cells[r["cell"]], target) for r in sel]
            walls = [steps_to_target(cells[r["cell"]], target, "learner_wall_s") for r in sel]
            hit = sum(np.isfinite(steps))
            reach.append(f"{fmt(mean_std(steps)[0], digits=0)} / {fmt(mean_std(walls)[0], digits=0)} "
                         f"({hit}/{len(sel)})" if sel else "n/a")
        body.append([src] + finals + reach)
    return markdown(header, body)


def cost_table(runs: list[dict], dtype: str, staleness: str, target: float, curves: list[dict]) -> str:
    """Per-route system cost at one setting, relative to `recompute`, next to its learning result."""
    rows = select(runs, dtype=dtype, staleness=staleness)
    cells = by_cell(curves)
    base = mean_std([r["perf/train_s"] for r in select(rows, source="recompute")])[0]
    header = ["route", "step s (sample + train)", "train s/step", "x recompute", "sample s/step", "sampler stall s/step",
              "forward passes", "param copies", "final success", f"steps to {target:g}"]
    body = []
    for src in routes_in(rows):
        sel = select(rows, source=src)
        train = mean_std([r["perf/train_s"] for r in sel])[0]
        body.append([src, fmt(mean_std([r["perf/step_s"] for r in sel])[0], digits=3), fmt(train, digits=3),
                     fmt(train / base if base else float("nan")),
                     fmt(mean_std([r["perf/sample_s"] for r in sel])[0], digits=3),
                     fmt(mean_std([r["proximal/sampler_stall_s"] for r in sel])[0], digits=4),
                     fmt(mean_std([r["proximal/forward_passes"] for r in sel])[0]),
                     fmt(mean_std([r["proximal/param_copies"] for r in sel])[0]),
                     fmt(*mean_std([r["success_final"] for r in sel])[:2]),
                     fmt(mean_std([steps_to_target(cells[r["cell"]], target) for r in sel])[0], digits=0)])
    return markdown(header, body)


def threshold_table(runs: list[dict]) -> str:
    """Effective clip fraction (tokens without gradient), PPO clip, truncation and rejection per threshold."""
    header = ["token_mask", "is_cap", "route", "effective clip", "PPO clip", "truncated", "rejected",
              "final success"]
    body = []
    settings = sorted({(r["token_mask"], r["is_cap"]) for r in runs})
    for tm, cap in settings:
        for src in routes_in(runs):
            sel = select(runs, token_mask=tm, is_cap=cap, source=src)
            if not sel:
                continue
            body.append([tm, cap, src] + [fmt(mean_std([r[k] for r in sel])[0], pct=True) for k in (
                "ratio/effective_clip_frac", "ratio/clip_frac", "is/truncated_frac", "mask/token_frac")]
                + [fmt(*mean_std([r["success_final"] for r in sel])[:2])])
    return markdown(header, body)


def mean_curve(curves: list[dict], x: str = "step") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std over runs of held-out success at each evaluation step; x averaged too."""
    cells = by_cell(curves)
    steps = sorted({r["step"] for r in curves})
    xs, ms, ss = [], [], []
    for st in steps:
        pts = [next((p for p in c if p["step"] == st), None) for c in cells.values()]
        pts = [p for p in pts if p is not None]
        xs.append(np.mean([p[x] for p in pts]))
        ms.append(np.mean([p["success"] for p in pts]))
        ss.append(np.std([p["success"] for p in pts]))
    return np.asarray(xs), np.asarray(ms), np.asarray(ss)


def plot_learning_curves(curves: list[dict], dtype: str, x: str = "step", path: str | None = None,
                         sources=None):
    """One panel per staleness: held-out success (mean over seeds, band = ± std) per route."""
    import matplotlib

    if path:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = select(curves, dtype=dtype)
    stal = staleness_in(rows)
    fig, axes = plt.subplots(1, len(stal), figsize=(3.6 * len(stal), 3.2), sharey=True, squeeze=False)
    for ax, st in zip(axes[0], stal):
        for src in sources or routes_in(rows):
            sel = select(rows, source=src, staleness=st)
            if not sel:
                continue
            xs, m, s = mean_curve(sel, x)
            color = f"C{ROUTE_ORDER.index(src)}"  # one color per route in every panel and figure
            ax.plot(xs, m, color=color, label=src, lw=1.5)
            ax.fill_between(xs, m - s, m + s, color=color, alpha=0.12)
        ax.set_title(f"staleness {st}, sampler {dtype}")
        ax.set_xlabel("RL step" if x == "step" else "learner wall-clock (s)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out success")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
    fig.tight_layout()
    # Outside the panels, to the right, so it never hides a curve.
    fig.legend([handles[k] for k in ROUTE_ORDER if k in handles], [k for k in ROUTE_ORDER if k in handles],
               fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), ncol=1)
    if path:
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
    return fig


def plot_entanglement(runs: list[dict], path: str | None = None):
    """Token-rejection fraction against staleness: recompute vs the exact route, per sampler numerics."""
    import matplotlib

    if path:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in runs})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(3.6 * len(dtypes), 3.2), sharey=True, squeeze=False)
    for ax, dt in zip(axes[0], dtypes):
        rows = select(runs, dtype=dt)
        st = staleness_in(rows)
        for i, (src, key, label) in enumerate((
                ("snapshot", "mask/token_frac", "exact (snapshot)"),
                ("recompute", "mask/token_frac", "recompute"),
                ("snapshot", "audit/recompute/mask/token_frac", "recompute on the exact batches (audit)"))):
            means = [mean_std([r[key] for r in select(rows, source=src, staleness=s)]) for s in st]
            ax.errorbar([int(s) for s in st], [100 * m for m, _, _ in means], [100 * s for _, s, _ in means],
                        marker="o", capsize=3, label=label, color=f"C{i}")
        ax.set_title(f"sampler {dt}")
        ax.set_xlabel("staleness (versions)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("tokens rejected by the (0.5, 2) band (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def report(routes_dir: str, thresholds_dir: str | None, out: str, target: float = 0.7) -> str:
    """All tables as markdown (also written to `<out>/report.md`) and the figures as PNGs in `<out>`."""
    os.makedirs(out, exist_ok=True)
    runs, curves = load(routes_dir)
    parts = [f"Results from `{routes_dir}` ({len(runs)} runs); means over seeds, ± std over seeds."]
    dtypes = sorted({r["dtype"] for r in runs})
    for dt in dtypes:
        parts.append(f"\n### Entanglement, sampler {dt}: discrepancy truncation / token rejection\n")
        parts.append(entanglement_table(runs, dt))
    for dt in dtypes:
        parts.append(f"\n### Learning, sampler {dt} (steps / learner seconds to {target:g}: mean over the seeds "
                     f"that reach it, (reached / seeds))\n")
        parts.append(learning_table(runs, curves, dt, target))
        for x in ("step", "learner_wall_s"):
            plot_learning_curves(curves, dt, x, os.path.join(out, f"curves_{dt}_{x}.png"))
    for dt in dtypes:
        parts.append(f"\n### Effective clip fraction (tokens without gradient), sampler {dt}\n")
        parts.append(metric_table(runs, dt, "ratio/effective_clip_frac"))
    cost_cells = [(dt, st) for dt in dtypes for st in staleness_in(select(runs, dtype=dt))
                  if len(routes_in(select(runs, dtype=dt, staleness=st))) == len(ROUTE_ORDER)]
    for dt, st in cost_cells:
        parts.append(f"\n### Cost per route, sampler {dt}, staleness {st}\n")
        parts.append(cost_table(runs, dt, st, target, curves))
    plot_entanglement(runs, os.path.join(out, "entanglement.png"))
    if thresholds_dir and os.path.exists(os.path.join(thresholds_dir, "runs.csv")):
        t_runs, _ = load(thresholds_dir)
        parts.append(f"\n### Threshold interaction (`{thresholds_dir}`, {len(t_runs)} runs)\n")
        parts.append(threshold_table(t_runs))
    text = "\n".join(parts) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routes", default="runs/experiments/routes")
    p.add_argument("--thresholds", default="runs/experiments/thresholds")
    p.add_argument("--out", default="runs/experiments/report")
    p.add_argument("--target", type=float, default=0.7, help="held-out success rate for steps-to-target")
    args = p.parse_args(argv)
    print(report(args.routes, args.thresholds, args.out, args.target))


if __name__ == "__main__":
    main()
