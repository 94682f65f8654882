"""Tables and figures from the experiment tables (`runs.csv`, `curves.csv` of a sweep).

    python -m jaxrl_async.experiments.report --routes=runs/experiments/routes \
        --thresholds=runs/experiments/thresholds --out=runs/experiments/report

Prints markdown tables (and writes them to `<out>/report.md`) and figures (PNG) that
answer the questions of the route sweep: the entanglement of staleness and mismatch
under `recompute`, the interaction with the loss thresholds, learning against steps and
against learner wall-clock per route, steps to a target success rate, and per-route
cost. Every number is a mean over seeds with its spread (std over seeds, `n` seeds).
The tables are pandas DataFrames (`load`); `seed_stats` is the one aggregation behind
every table and figure.

    python -m jaxrl_async.experiments.report --three_term=runs/experiments/three_term \
        --out=runs/experiments/three_term_report

writes the three-term sweep's report instead (`three_term_report`): per setting, the routes'
learning, masks, stability and cost with 95% BCa bootstrap intervals over seeds
(`bootstrap_ci`, `bootstrap_compare`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from jaxrl_async.core.proximal import Route
from jaxrl_async.experiments.sweep import GRAD_SPIKE_FACTOR

ROUTE_ORDER = tuple(r.value for r in Route)  # every proximal.source, exact first
AXES = ("source", "staleness", "dtype", "seed", "is_cap", "token_mask", "anchor", "logit_noise_std")
TEXT_COLUMNS = AXES + ("cell", "config")  # read as strings, so `staleness == "4"` and `token_mask == "None"` work


def read_table(path: str) -> pd.DataFrame:
    """A CSV written by `sweep.collect`: the axes, `cell` and `config` as strings, every other
    column parsed as numbers (`nan` or empty: missing)."""
    columns = pd.read_csv(path, nrows=0).columns
    text = [c for c in columns if c in TEXT_COLUMNS]
    return pd.read_csv(path, dtype={c: str for c in text}, keep_default_na=False,
                       na_values={c: ["", "nan", "NaN"] for c in columns if c not in text})


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


def load(results_dir: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, curves) of one sweep's output directory."""
    return read_table(os.path.join(results_dir, "runs.csv")), read_table(os.path.join(results_dir, "curves.csv"))


def select(df: pd.DataFrame, **where) -> pd.DataFrame:
    """Rows whose columns equal `where` (compared as strings, so `staleness=4` works)."""
    keep = pd.Series(True, index=df.index)
    for k, v in where.items():
        if k not in df:
            return df.iloc[:0]
        keep &= df[k].astype(str) == str(v)
    return df[keep]


def _finite(values) -> pd.DataFrame | pd.Series:
    """`values` as floats with inf as missing: statistics are over the finite values."""
    return values.astype(float).replace([np.inf, -np.inf], np.nan)


def mean_std(values) -> tuple[float, float, int]:
    """(mean, std over seeds, n) of the finite values; nan when there are none."""
    v = _finite(pd.Series(values, dtype=float)).dropna()
    if v.empty:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, int(len(v))


def seed_stats(df: pd.DataFrame, by: Sequence[str], keys: Sequence[str]) -> pd.DataFrame:
    """Per group of `by`: mean, std (over seeds; 0 for one seed) and count `n` of the finite
    values of each of `keys`, and the group's `rows`. Columns `(key, "mean" | "std" | "n")`
    and `("rows", "")`; the index is `by`."""
    keys = list(keys)
    groups = _finite(df[keys]).groupby([df[c] for c in by])
    stats = groups.agg(["mean", "std", "count"]).rename(columns={"count": "n"}, level=1)
    for k in keys:
        stats.loc[stats[(k, "n")] == 1, (k, "std")] = 0.0
    stats[("rows", "")] = groups.size()
    return stats


def _at(stats: pd.DataFrame, group, key: str, stat: str = "mean") -> float:
    """One statistic of one group of `seed_stats` (nan, or 0 rows, for a group with no runs)."""
    if group not in stats.index:
        return 0 if key == "rows" else float("nan")
    return stats.at[group, (key, "" if key == "rows" else stat)]


def fmt(m: float, s: float | None = None, n: int | None = None, pct: bool = False, digits: int = 2) -> str:
    if not np.isfinite(m):
        return "n/a"
    scale, unit = (100.0, "%") if pct else (1.0, "")
    text = f"{m * scale:.{digits}f}{unit}"
    if s is not None and np.isfinite(s):
        text += f" ± {s * scale:.{digits}f}"
    return text


def routes_in(df: pd.DataFrame) -> list[str]:
    present = set(df["source"])
    return [s for s in ROUTE_ORDER if s in present]


def staleness_in(df: pd.DataFrame) -> list[str]:
    return sorted(set(df["staleness"]), key=int)


def markdown(table: pd.DataFrame) -> str:
    """A markdown table of a DataFrame of strings (`DataFrame.to_markdown`): its columns are the header,
    its index is not written, and every cell is written as given (no re-formatting of numbers)."""
    return table.to_markdown(index=False, disable_numparse=True)


def steps_to_target(curve, target: float, x: str = "step") -> float:
    """First `x` (step or learner_wall_s) at which held-out success reaches `target`, linearly
    interpolated between evaluations; nan if the run never reaches it.

    curve: one run's evaluations, a DataFrame or a list of dicts with `step`, `success` and `x`.
    """
    pts = pd.DataFrame(curve)
    if pts.empty:
        return float("nan")
    pts = pts.sort_values("step", kind="stable")
    success, xs = pts["success"].to_numpy(float), pts[x].to_numpy(float)
    for i in range(1, len(pts)):
        if success[i] >= target:
            if success[i - 1] >= target:
                return float(xs[i - 1])
            frac = (target - success[i - 1]) / (success[i] - success[i - 1])
            return float(xs[i - 1] + frac * (xs[i] - xs[i - 1]))
    return float(xs[0]) if success[0] >= target else float("nan")


def reach_target(curves: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per cell (the index): `to_target_step` and `to_target_wall_s`, the step and learner
    seconds at which its held-out success reaches `target` (nan if it never does)."""
    reach = {cell: (steps_to_target(c, target), steps_to_target(c, target, "learner_wall_s"))
             for cell, c in curves.groupby("cell")}
    return pd.DataFrame.from_dict(reach, orient="index", columns=["to_target_step", "to_target_wall_s"])


def _with_reach(runs: pd.DataFrame, curves: pd.DataFrame, target: float) -> pd.DataFrame:
    """`runs` with each run's `reach_target` columns (nan for a run without evaluations)."""
    return runs.join(reach_target(curves, target), on="cell")


def entanglement_table(runs: pd.DataFrame, dtype: str) -> str:
    """Discrepancy truncation and token-rejection fractions against staleness, per route.

    `snapshot (as recompute)` is the audit the exact route logs on its own batches: what
    `recompute` would have truncated and rejected on exactly the same data.
    """
    rows = select(runs, dtype=dtype)
    sources = [s for s in routes_in(rows) if s in ("snapshot", "recompute", "bypass", "loglinear", "ewma",
                                                    "revised_ewma")]
    keys = ("is/truncated_frac", "mask/token_frac")
    audit = ("audit/recompute/is/truncated_frac", "audit/recompute/mask/token_frac")
    stats = seed_stats(rows, ["staleness", "source"], keys + audit)

    def pair(group, ks):
        return " / ".join(fmt(_at(stats, group, k), pct=True) for k in ks)

    table = pd.DataFrame(
        [[st] + [pair((st, s), keys) for s in sources] + [pair((st, "snapshot"), audit)] for st in staleness_in(rows)],
        columns=["staleness"] + [f"{s} trunc / mask" for s in sources] + ["snapshot (as recompute) trunc / mask"])
    return markdown(table)


def metric_table(runs: pd.DataFrame, dtype: str, key: str, pct: bool = True) -> str:
    """One per-step metric (run mean, then mean ± std over seeds) per route and staleness."""
    rows = select(runs, dtype=dtype)
    stal = staleness_in(rows)
    stats = seed_stats(rows, ["source", "staleness"], [key])
    table = pd.DataFrame(
        [[src] + [fmt(_at(stats, (src, st), key), _at(stats, (src, st), key, "std"), pct=pct) for st in stal]
         for src in routes_in(rows)],
        columns=["route"] + [f"s={s}" for s in stal])
    return markdown(table)


def learning_table(runs: pd.DataFrame, curves: pd.DataFrame, dtype: str, target: float) -> str:
    """Per route and staleness: final held-out success, steps and learner seconds to `target`."""
    rows = _with_reach(select(runs, dtype=dtype), curves, target)
    stal = staleness_in(rows)
    stats = seed_stats(rows, ["source", "staleness"], ["success_final", "to_target_step", "to_target_wall_s"])
    body = []
    for src in routes_in(rows):
        finals = [fmt(_at(stats, (src, st), "success_final"), _at(stats, (src, st), "success_final", "std"))
                  for st in stal]
        reach = [f"{fmt(_at(stats, g, 'to_target_step'), digits=0)} / "
                 f"{fmt(_at(stats, g, 'to_target_wall_s'), digits=0)} "
                 f"({_at(stats, g, 'to_target_step', 'n')}/{_at(stats, g, 'rows')})" if g in stats.index else "n/a"
                 for g in ((src, st) for st in stal)]
        body.append([src] + finals + reach)
    columns = ["route"] + [f"s={s}: final success" for s in stal] + [f"s={s}: steps / s to {target:g}" for s in stal]
    return markdown(pd.DataFrame(body, columns=columns))


def cost_table(runs: pd.DataFrame, dtype: str, staleness: str, target: float, curves: pd.DataFrame) -> str:
    """Per-route system cost at one setting, relative to `recompute`, next to its learning result."""
    rows = _with_reach(select(runs, dtype=dtype, staleness=staleness), curves, target)
    keys = ["perf/step_s", "perf/train_s", "perf/sample_s", "proximal/sampler_stall_s", "proximal/forward_passes",
            "proximal/param_copies", "success_final", "to_target_step"]
    stats = seed_stats(rows, ["source"], keys)
    base = _at(stats, "recompute", "perf/train_s")
    body = []
    for src in routes_in(rows):
        train = _at(stats, src, "perf/train_s")
        body.append([src, fmt(_at(stats, src, "perf/step_s"), digits=3), fmt(train, digits=3),
                     fmt(train / base if base else float("nan")),
                     fmt(_at(stats, src, "perf/sample_s"), digits=3),
                     fmt(_at(stats, src, "proximal/sampler_stall_s"), digits=4),
                     fmt(_at(stats, src, "proximal/forward_passes")),
                     fmt(_at(stats, src, "proximal/param_copies")),
                     fmt(_at(stats, src, "success_final"), _at(stats, src, "success_final", "std")),
                     fmt(_at(stats, src, "to_target_step"), digits=0)])
    columns = ["route", "step s (sample + train)", "train s/step", "x recompute", "sample s/step",
               "sampler stall s/step", "forward passes", "param copies", "final success", f"steps to {target:g}"]
    return markdown(pd.DataFrame(body, columns=columns))


def threshold_table(runs: pd.DataFrame) -> str:
    """Effective clip fraction (tokens without gradient), PPO clip, truncation and rejection per threshold."""
    keys = ["ratio/effective_clip_frac", "ratio/clip_frac", "is/truncated_frac", "mask/token_frac"]
    stats = seed_stats(runs, ["token_mask", "is_cap", "source"], keys + ["success_final"])
    body = []
    for tm, cap in sorted(set(zip(runs["token_mask"], runs["is_cap"]))):
        for src in routes_in(runs):
            g = (tm, cap, src)
            if g in stats.index:
                body.append([tm, cap, src] + [fmt(_at(stats, g, k), pct=True) for k in keys]
                            + [fmt(_at(stats, g, "success_final"), _at(stats, g, "success_final", "std"))])
    columns = ["token_mask", "is_cap", "route", "effective clip", "PPO clip", "truncated", "rejected", "final success"]
    return markdown(pd.DataFrame(body, columns=columns))


def mean_curve(curves: pd.DataFrame, x: str = "step") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std over runs of held-out success at each evaluation step; x averaged too."""
    per_step = curves.drop_duplicates(["cell", "step"]).groupby("step")
    return (per_step[x].mean().to_numpy(), per_step["success"].mean().to_numpy(),
            per_step["success"].std(ddof=0).to_numpy())


def plot_learning_curves(curves: pd.DataFrame, dtype: str, x: str = "step", path: str | None = None,
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
            if sel.empty:
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


def plot_entanglement(runs: pd.DataFrame, path: str | None = None):
    """Token-rejection fraction against staleness: recompute vs the exact route, per sampler numerics."""
    import matplotlib

    if path:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted(set(runs["dtype"]))
    stats = seed_stats(runs, ["dtype", "source", "staleness"], ["mask/token_frac", "audit/recompute/mask/token_frac"])
    fig, axes = plt.subplots(1, len(dtypes), figsize=(3.6 * len(dtypes), 3.2), sharey=True, squeeze=False)
    for ax, dt in zip(axes[0], dtypes):
        st = staleness_in(select(runs, dtype=dt))
        for i, (src, key, label) in enumerate((
                ("snapshot", "mask/token_frac", "exact (snapshot)"),
                ("recompute", "mask/token_frac", "recompute"),
                ("snapshot", "audit/recompute/mask/token_frac", "recompute on the exact batches (audit)"))):
            means = [100 * _at(stats, (dt, src, s), key) for s in st]
            stds = [100 * _at(stats, (dt, src, s), key, "std") for s in st]
            ax.errorbar([int(s) for s in st], means, stds, marker="o", capsize=3, label=label, color=f"C{i}")
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
    dtypes = sorted(set(runs["dtype"]))
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
    routes_per_setting = runs[runs["source"].isin(ROUTE_ORDER)].groupby(["dtype", "staleness"])["source"].nunique()
    cost_cells = [(dt, st) for dt in dtypes for st in staleness_in(select(runs, dtype=dt))
                  if routes_per_setting.get((dt, st), 0) == len(ROUTE_ORDER)]
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


# ---------------------------------------------------------------------------------------------
# Bootstrap confidence intervals over seeds, and the three-term sweep (configs/experiments/three_term.py)


@dataclasses.dataclass(frozen=True)
class Interval:
    """A statistic over seeds with its bootstrap interval (BCa): `estimate` on the sample
    itself, `[low, high]` the interval, `n` the number of (finite) seeds."""
    estimate: float
    low: float
    high: float
    n: int

    def fmt(self, digits: int = 2, pct: bool = False) -> str:
        if not np.isfinite(self.estimate):
            return "n/a"
        scale, unit = (100.0, "%") if pct else (1.0, "")
        return (f"{self.estimate * scale:.{digits}f}{unit} "
                f"[{self.low * scale:.{digits}f}, {self.high * scale:.{digits}f}]")


def _clean(values) -> np.ndarray:
    v = np.asarray(values, dtype=float).ravel()
    return v[np.isfinite(v)]


def _bca(data: tuple, statistic, paired: bool, n_resamples: int, level: float, seed: int,
         estimate: float) -> tuple[float, float]:
    """The BCa interval of `statistic` over the samples in `data` (`scipy.stats.bootstrap`, seeded by
    numpy's default_rng(seed)); `(estimate, estimate)` when every resample gives the same value
    (one seed, or constant data: BCa is undefined there, the interval is that value)."""
    if min(len(d) for d in data) < 2:
        return estimate, estimate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)  # constant data: handled below
        with np.errstate(divide="ignore", invalid="ignore"):
            res = stats.bootstrap(data, statistic, paired=paired, vectorized=True, n_resamples=n_resamples,
                                  confidence_level=level, method="BCa", rng=np.random.default_rng(seed))
    low, high = (float(x) for x in res.confidence_interval)
    dist = res.bootstrap_distribution
    if not (np.isfinite(low) and np.isfinite(high)) and np.all(dist == dist.flat[0]):
        return estimate, estimate
    return low, high


def bootstrap_ci(values, statistic=np.mean, n_resamples: int = 10_000, level: float = 0.95,
                 seed: int = 0) -> Interval:
    """Bias-corrected and accelerated (BCa) bootstrap interval of `statistic` over `values`
    (one value per seed), from `scipy.stats.bootstrap`.

    Resamples the finite values with replacement `n_resamples` times (numpy's default_rng(seed),
    so the interval is reproducible); BCa corrects the percentile interval for the bias and
    skew of the resampled statistic. `statistic(x, axis=-1)` must reduce along the last axis
    (np.mean, np.median). With one value the interval is that value; with none, nan and n = 0.
    At five seeds no bootstrap interval reaches its level (BCa covers the mean of 5 normal
    draws 86% of the time at 95%, as the plain percentile interval does): read it as the
    spread the seeds show, not a guarantee.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    v = _clean(values)
    if v.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    estimate = float(statistic(v, axis=-1))
    low, high = _bca((v,), statistic, False, n_resamples, level, seed, estimate)
    return Interval(estimate, low, high, int(v.size))


def bootstrap_compare(a, b, kind: str = "diff", paired: bool = True, n_resamples: int = 10_000,
                      level: float = 0.95, seed: int = 0) -> Interval:
    """BCa interval (`scipy.stats.bootstrap`) of mean(a) - mean(b) (`kind="diff"`) or
    mean(a) / mean(b) (`"ratio"`).

    `paired`: `a[i]` and `b[i]` are the same seed (same warm start and task seeds), so the seeds
    are resampled together and pairs with a non-finite side are dropped; else each side is
    resampled on its own.
    """
    if kind not in ("diff", "ratio"):
        raise ValueError(f"kind must be 'diff' or 'ratio'; got {kind!r}")
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if paired:
        if a.shape != b.shape:
            raise ValueError(f"paired samples need the same length; got {a.size} and {b.size}")
        keep = np.isfinite(a) & np.isfinite(b)
        a, b = a[keep], b[keep]
    else:
        a, b = _clean(a), _clean(b)
    n = int(min(a.size, b.size))
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    op = np.subtract if kind == "diff" else np.divide

    def statistic(x, y, axis=-1):
        return op(np.mean(x, axis=axis), np.mean(y, axis=axis))

    with np.errstate(divide="ignore", invalid="ignore"):
        estimate = float(statistic(a, b))
    low, high = _bca((a, b), statistic, paired, n_resamples, level, seed, estimate)
    return Interval(estimate, low, high, n)


# The routes of the three-term sweep: (proximal.source, proximal.anchor) -> a name for the tables.
THREE_TERM_ROUTES = {
    ("recompute", "None"): "recompute",
    ("snapshot", "None"): "exact",
    ("snapshot", "recompute"): "three-term",
    ("revised_ewma", "None"): "revised_ewma as pi_old",
    ("snapshot", "revised_ewma"): "three-term, revised_ewma anchor",
}
THREE_TERM_ORDER = tuple(THREE_TERM_ROUTES.values())
# A run whose held-out success falls this far below its own running best has collapsed.
COLLAPSE_DRAWDOWN = 0.2


def route_name(source: str, anchor) -> str:
    """The three-term sweep's name of a (source, anchor) pair; other pairs as `source + anchor`."""
    anchor = "None" if anchor is None or (isinstance(anchor, float) and np.isnan(anchor)) or anchor == "" else anchor
    return THREE_TERM_ROUTES.get((source, str(anchor)), source if anchor == "None" else f"{source} + {anchor}")


def with_route(runs: pd.DataFrame) -> pd.DataFrame:
    """`runs` with a `route` column (the sweep's name of its source and anchor)."""
    anchors = runs["anchor"] if "anchor" in runs else pd.Series("None", index=runs.index)
    return runs.assign(route=[route_name(s, a) for s, a in zip(runs["source"], anchors)])


def three_term_runs(runs: pd.DataFrame, curves: pd.DataFrame, target: float) -> pd.DataFrame:
    """One row per run with `route`, `to_target_step` / `to_target_wall_s` (nan: never reached),
    `to_target_step_censored` (an unreached run counted at its step budget: a lower bound) and
    `collapsed` (held-out success fell `COLLAPSE_DRAWDOWN` below its running best)."""
    rows = with_route(_with_reach(runs, curves, target))
    rows["to_target_step_censored"] = rows["to_target_step"].fillna(rows["steps"].astype(float))
    rows["collapsed"] = (rows["success_drawdown"] >= COLLAPSE_DRAWDOWN).astype(float)
    return rows


def settings_in(runs: pd.DataFrame) -> list[tuple[str, str, str]]:
    """The (staleness, dtype, logit_noise_std) settings present, ordered."""
    noise = runs["logit_noise_std"] if "logit_noise_std" in runs else pd.Series("0.0", index=runs.index)
    found = set(zip(runs["staleness"], runs["dtype"], noise))
    return sorted(found, key=lambda s: (float(s[2]), s[1], int(s[0])))


def _setting_rows(rows: pd.DataFrame, setting) -> pd.DataFrame:
    st, dt, noise = setting
    return select(rows, staleness=st, dtype=dt, logit_noise_std=noise) if "logit_noise_std" in rows else \
        select(rows, staleness=st, dtype=dt)


def setting_name(setting) -> str:
    st, dt, noise = setting
    return f"staleness {st}, {dt} sampler" + (f", logit noise {noise}" if float(noise) else "")


def _routes_of(rows: pd.DataFrame) -> list[str]:
    present = set(rows["route"])
    return [r for r in THREE_TERM_ORDER if r in present] + sorted(present - set(THREE_TERM_ORDER))


def _by_seed(rows: pd.DataFrame, route: str, key: str) -> pd.Series:
    sel = rows[rows["route"] == route]
    return pd.Series(sel[key].to_numpy(float), index=sel["seed"].astype(str)).sort_index()


def three_term_learning_table(rows: pd.DataFrame, target: float, **bootstrap) -> str:
    """Per route at one setting: final success, steps and learner seconds to `target`, discrepancy
    rejection and truncation, the `recompute` audit on the exact batches, the staleness weight's
    truncation, the effective clip fraction. Means over seeds with 95% BCa bootstrap intervals."""
    body = []
    for route in _routes_of(rows):
        sel = rows[rows["route"] == route]
        reached = int(sel["to_target_step"].notna().sum())
        steps = bootstrap_ci(sel["to_target_step_censored"], **bootstrap)
        steps_text = steps.fmt(1) if reached == len(sel) else f">= {steps.fmt(1)}"
        audit = sel.get("audit/recompute/mask/token_frac", pd.Series(dtype=float))
        body.append([
            route, f"{len(sel)}", bootstrap_ci(sel["success_final"], **bootstrap).fmt(3),
            f"{steps_text} ({reached}/{len(sel)})",
            bootstrap_ci(sel["to_target_wall_s"], **bootstrap).fmt(1),
            bootstrap_ci(sel["mask/token_frac"], **bootstrap).fmt(2, pct=True),
            bootstrap_ci(sel["is/truncated_frac"], **bootstrap).fmt(2, pct=True),
            bootstrap_ci(audit, **bootstrap).fmt(2, pct=True),
            bootstrap_ci(sel.get("staleness/is_truncated_frac", pd.Series(dtype=float)), **bootstrap).fmt(2, pct=True),
            bootstrap_ci(sel["ratio/effective_clip_frac"], **bootstrap).fmt(2, pct=True)])
    columns = ["route", "seeds", "final success", f"steps to {target:g} (reached)",
               f"learner s to {target:g} (runs reaching it)", "discrepancy rejected", "discrepancy truncated",
               "recompute would reject (audit)", "staleness weight truncated", "effective clip"]
    return markdown(pd.DataFrame(body, columns=columns))


def three_term_stability_table(rows: pd.DataFrame, **bootstrap) -> str:
    """Per route at one setting: collapses, success drawdown, gradient-norm spikes, skipped updates, cost."""
    body = []
    for route in _routes_of(rows):
        sel = rows[rows["route"] == route]
        body.append([
            route, f"{int(sel['collapsed'].sum())}/{len(sel)}",
            bootstrap_ci(sel["success_drawdown"], **bootstrap).fmt(3),
            bootstrap_ci(sel["grad_norm_max_over_median"], **bootstrap).fmt(2),
            f"{int(sel['grad_spikes'].sum())} ({int((sel['grad_spikes'] > 0).sum())}/{len(sel)} runs)",
            f"{int(np.nansum(sel['skipped_nonfinite']))}",
            bootstrap_ci(sel["perf/train_s"], **bootstrap).fmt(3),
            fmt(float(sel["proximal/forward_passes"].mean()))])
    columns = ["route", f"collapsed (drawdown >= {COLLAPSE_DRAWDOWN:g})", "max success drawdown",
               "max / median grad norm", f"grad spikes (> {GRAD_SPIKE_FACTOR:g}x median)", "skipped non-finite",
               "train s/step", "forward passes/step"]
    return markdown(pd.DataFrame(body, columns=columns))


def three_term_comparisons(rows: pd.DataFrame, pairs, **bootstrap) -> str:
    """Paired (by seed) differences and ratios between routes at one setting: final success
    difference, steps-to-target ratio (unreached runs at the step budget), discrepancy-rejection
    difference, train-time ratio; each with its 95% bootstrap interval."""
    body = []
    present = set(rows["route"])
    for a, b in pairs:
        if a not in present or b not in present:
            continue

        def paired(key, kind, a=a, b=b):  # binds this pair (B023)
            sa, sb = _by_seed(rows, a, key), _by_seed(rows, b, key)
            seeds = sa.index.intersection(sb.index)
            return bootstrap_compare(sa[seeds], sb[seeds], kind=kind, **bootstrap)

        body.append([f"{a} vs {b}", paired("success_final", "diff").fmt(3),
                     paired("to_target_step_censored", "ratio").fmt(2),
                     paired("mask/token_frac", "diff").fmt(2, pct=True),
                     paired("perf/train_s", "ratio").fmt(2)])
    columns = ["A vs B", "final success A - B", "steps to target A / B", "discrepancy rejected A - B",
               "train s/step A / B"]
    return markdown(pd.DataFrame(body, columns=columns)) if body else "(no pair of these routes ran here)"


# The comparisons each question of issue 15 asks for, by the setting's sampler numerics.
THREE_TERM_PAIRS = (
    ("three-term", "recompute"), ("three-term", "exact"), ("exact", "recompute"),
    ("revised_ewma as pi_old", "exact"), ("three-term, revised_ewma anchor", "exact"),
    ("three-term, revised_ewma anchor", "three-term"), ("revised_ewma as pi_old", "recompute"),
)


def plot_three_term_curves(rows_curves: pd.DataFrame, settings, path: str | None = None):
    """One panel per setting: held-out success against RL step, mean over seeds (band: ± std), per route."""
    import matplotlib

    if path:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings), figsize=(3.8 * len(settings), 3.3), sharey=True, squeeze=False)
    for ax, setting in zip(axes[0], settings):
        sel = _setting_rows(rows_curves, setting)
        for route in _routes_of(sel):
            xs, m, s = mean_curve(sel[sel["route"] == route])
            color = f"C{THREE_TERM_ORDER.index(route) if route in THREE_TERM_ORDER else len(THREE_TERM_ORDER)}"
            ax.plot(xs, m, color=color, label=route, lw=1.5)
            ax.fill_between(xs, m - s, m + s, color=color, alpha=0.12)
        ax.set_title(setting_name(setting), fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out success")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
    fig.tight_layout()
    names = [k for k in THREE_TERM_ORDER if k in handles]
    fig.legend([handles[k] for k in names], names, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if path:
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
    return fig


def three_term_report(results_dir: str, out: str, target: float = 0.7, n_resamples: int = 10_000,
                      seed: int = 0) -> str:
    """The three-term sweep's tables (markdown, also `<out>/report.md`) and its curves
    (`<out>/curves.png`): per setting, learning and masks, stability and cost, and the paired
    comparisons between routes; 95% BCa bootstrap intervals over seeds."""
    os.makedirs(out, exist_ok=True)
    runs, curves = load(results_dir)
    rows = three_term_runs(runs, curves, target)
    bootstrap = {"n_resamples": n_resamples, "seed": seed}
    settings = settings_in(rows)
    parts = [f"Results from `{results_dir}` ({len(rows)} runs). Means over seeds with 95% BCa bootstrap "
             f"intervals ({n_resamples} resamples over seeds, seed {seed}); comparisons are paired by seed. "
             f"Steps to {target:g}: held-out success interpolated between evaluations; a run that never "
             f"reaches it counts at its step budget (marked >=, a lower bound)."]
    for setting in settings:
        sel = _setting_rows(rows, setting)
        parts.append(f"\n### {setting_name(setting)}: learning and masks\n")
        parts.append(three_term_learning_table(sel, target, **bootstrap))
        parts.append(f"\n### {setting_name(setting)}: stability and cost\n")
        parts.append(three_term_stability_table(sel, **bootstrap))
        parts.append(f"\n### {setting_name(setting)}: paired comparisons\n")
        parts.append(three_term_comparisons(sel, THREE_TERM_PAIRS, **bootstrap))
    curve_rows = with_route(curves)
    plot_three_term_curves(curve_rows, settings, os.path.join(out, "curves.png"))
    text = "\n".join(parts) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    return text


def main(argv):
    """`python -m jaxrl_async.experiments.report`: the flags are defined below, in `__main__`."""
    from absl import app, flags, logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.WARNING)
    if FLAGS.three_term:
        print(three_term_report(FLAGS.three_term, FLAGS.out, FLAGS.target))
        return
    print(report(FLAGS.routes, FLAGS.thresholds, FLAGS.out, FLAGS.target))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("routes", "runs/experiments/routes", "Output directory of the route sweep.")
    flags.DEFINE_string("thresholds", "runs/experiments/thresholds",
                        "Output directory of the threshold sweep (its table is left out when it has no runs.csv).")
    flags.DEFINE_string("out", "runs/experiments/report", "Where report.md and the figures go.")
    flags.DEFINE_float("target", 0.7, "Held-out success rate for steps-to-target.")
    flags.DEFINE_string("three_term", None, "Output directory of the three-term sweep "
                        "(configs/experiments/three_term.py): write its report (bootstrap intervals) instead.")
    app.run(main)
