"""The experiment runner, the report, and the notebooks, on the seconds-long smoke sweep.

One smoke sweep per module (14 tiny cells on 2 workers) serves every test here: the
tables it writes, the rerun that skips finished cells, the resume of an unfinished one,
the report, and the three notebooks, which CI executes top to bottom against it.
"""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from jaxrl_async.experiments import report
from jaxrl_async.experiments import sweep as experiments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "experiments", "smoke.py")
NOTEBOOKS = ("01_ratio_decomposition", "02_routes_and_costs", "03_learning_curves")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    base = tmp_path_factory.mktemp("experiments")
    out, cache = str(base / "smoke"), str(base / "warmstart_cache")
    experiments.run_sweep(SMOKE, out, workers=2, warmstart_cache=cache)
    return out, cache


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_expand_dedupes_and_names_cells():
    sweep = experiments.load_sweep(SMOKE)
    cells = experiments.expand(sweep)
    assert len(cells) == 8 + 8 - 2  # the second block repeats snapshot and recompute at staleness 2, seed 0
    ids = [cid for cid, _ in cells]
    assert len(set(ids)) == len(ids)
    assert "source=recompute__staleness=2__dtype=bf16__seed=1" in ids
    assert experiments.cell_id({"loss.token_mask": (0.5, 2.0), "loss.is_cap": 5.0}) == "token_mask=0.5-2.0__is_cap=5.0"


def test_staleness_axis_sets_the_inline_schedule():
    c = experiments.load_sweep(SMOKE).get_config()
    experiments.set_staleness(c, 0)
    assert (c.runtime.lag, c.runtime.partial_rollout) == (0, False)
    experiments.set_staleness(c, 4)
    assert (c.runtime.lag, c.runtime.partial_rollout) == (4, True)
    with pytest.raises(ValueError, match="staleness"):
        experiments.set_staleness(c, -1)


def test_bad_axis_fails_before_anything_runs(tmp_path):
    sweep_file = tmp_path / "bad.py"
    sweep_file.write_text(f"exec(open({SMOKE!r}).read())\n"
                          "def get_sweep():\n    return [{'loss.not_a_field': (1,), 'seed': (0,)}]\n")
    with pytest.raises(SystemExit, match="loss.not_a_field"):
        experiments.run_sweep(str(sweep_file), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    sweep_file.write_text(f"exec(open({SMOKE!r}).read())\n"
                          "def get_sweep():\n    return [{'numerics.dtype': ('fp8',), 'seed': (0,)}]\n")
    with pytest.raises(SystemExit, match=r"numerics\.dtype"):
        experiments.run_sweep(str(sweep_file), str(tmp_path / "out"))
    sweep_file.write_text(f"exec(open({SMOKE!r}).read())\n"  # a subtree is not a field
                          "def get_sweep():\n    return [{'loss': ({},), 'seed': (0,)}]\n")
    with pytest.raises(SystemExit, match="'loss' is not a config field"):
        experiments.run_sweep(str(sweep_file), str(tmp_path / "out"))


def test_steps_to_target_interpolates_between_evaluations():
    curve = [{"step": 0, "success": 0.2, "learner_wall_s": 0.0}, {"step": 10, "success": 0.6, "learner_wall_s": 5.0},
             {"step": 20, "success": 1.0, "learner_wall_s": 9.0}]
    assert report.steps_to_target(curve, 0.8) == pytest.approx(15.0)
    assert report.steps_to_target(curve, 0.8, "learner_wall_s") == pytest.approx(7.0)
    assert report.steps_to_target(curve, 0.1) == 0.0
    assert np.isnan(report.steps_to_target(curve, 1.1))


def test_report_reproduces_the_committed_report(tmp_path):
    # The committed tables (docs/results) give the committed report.md, table for table.
    results = os.path.join(ROOT, report.COMMITTED_RESULTS)
    text = report.report(os.path.join(results, "routes"), os.path.join(results, "thresholds"), str(tmp_path))
    expected = open(os.path.join(results, "report.md")).read()
    for name in ("routes", "thresholds"):
        expected = expected.replace(f"`runs/experiments/{name}`", f"`{os.path.join(results, name)}`")
    assert text == expected
    assert os.path.getsize(tmp_path / "entanglement.png") > 0


def test_read_table_keeps_axes_as_text(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text("cell,source,staleness,token_mask,is_cap,success_final,is/ess\n"
                    "a,snapshot,4,None,2.0,0.5,nan\nb,recompute,4,0.5-2.0,5.0,0.25,\n")
    runs = report.read_table(str(path))
    assert list(runs["token_mask"]) == ["None", "0.5-2.0"]
    assert list(runs["staleness"]) == ["4", "4"] and list(runs["is_cap"]) == ["2.0", "5.0"]
    assert runs["success_final"].tolist() == [0.5, 0.25] and runs["is/ess"].isna().all()
    assert len(report.select(runs, staleness=4, token_mask="None")) == 1
    stats = report.seed_stats(runs, ["staleness"], ["success_final", "is/ess"])
    assert stats.loc["4", ("success_final", "mean")] == pytest.approx(0.375)
    assert stats.loc["4", ("is/ess", "n")] == 0 and stats.loc["4", ("rows", "")] == 2


@pytest.mark.parametrize("module, flags", [
    ("jaxrl_async.experiments.sweep", ("--sweep", "--out", "--workers", "--warmstart_cache", "--collect_only")),
    ("jaxrl_async.experiments.report", ("--routes", "--thresholds", "--out", "--target", "--three_term")),
    ("benchmarks.run", ("--full", "--sections")),
    ("benchmarks.kernels", ("--json", "--async-steps", "--sections")),
    ("benchmarks.routes", ("--steps", "--lag", "--partial", "--numerics", "--seed", "--routes", "--out")),
    ("benchmarks.soak", ("--seconds", "--every_kind", "--runtime", "--model", "--workdir", "--proximal")),
])
def test_cli_help_lists_the_flags_the_makefile_and_docs_use(module, flags):
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    for flag in flags:
        assert f"  {flag}:" in r.stdout or f"  --[no]{flag[2:]}:" in r.stdout, (flag, r.stdout)


def test_results_dir_prefers_env_then_own_sweep_then_committed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JAXRL_RESULTS", raising=False)
    assert report.results_dir("routes", "JAXRL_RESULTS") is None
    for d in ("docs/results/routes", "runs/experiments/routes", "mine"):
        os.makedirs(d)
        (tmp_path / d / "runs.csv").write_text("cell\n")
        expected = d if d != "mine" else "runs/experiments/routes"  # "mine" only counts through the env var
        assert report.results_dir("routes", "JAXRL_RESULTS") == expected
    monkeypatch.setenv("JAXRL_RESULTS", "mine")
    assert report.results_dir("routes", "JAXRL_RESULTS") == "mine"
    monkeypatch.setenv("JAXRL_RESULTS", "missing")  # set but empty of results: no silent fallback
    assert report.results_dir("routes", "JAXRL_RESULTS") is None


@pytest.mark.slow
def test_sweep_writes_one_row_per_cell_with_its_config(smoke):
    out, _ = smoke
    cells = dict(experiments.expand(experiments.load_sweep(SMOKE)))
    runs = _read(os.path.join(out, "runs.csv"))
    assert sorted(r["cell"] for r in runs) == sorted(cells)
    for r in runs:
        config = json.loads(r["config"])
        axes = cells[r["cell"]]
        assert config["proximal"]["source"] == r["source"] == axes["proximal.source"]
        assert config["runtime"]["lag"] == int(r["staleness"]) == axes["staleness"]
        assert config["runtime"]["partial_rollout"] == (axes["staleness"] > 0)
        assert config["seed"] == int(r["seed"])
        assert int(r["steps"]) == config["train"]["steps"]
        assert 0.0 <= float(r["success_final"]) <= 1.0
        # Token staleness is what the axis says: s or s + 1 versions (s + 1 before the mid-episode
        # switch), less in the first steps, when there are no s older versions yet.
        s = axes["staleness"]
        assert (0 < float(r["staleness/mean"]) <= s + 1) if s else float(r["staleness/mean"]) == 0
    curves = _read(os.path.join(out, "curves.csv"))
    steps = sorted({int(r["step"]) for r in curves})
    assert steps == [0, 3, 6]
    assert len(curves) == 3 * len(cells)
    # Learner wall-clock grows along each curve.
    for cid in cells:
        walls = [float(r["learner_wall_s"]) for r in curves if r["cell"] == cid]
        assert walls[0] == 0.0 and walls[1] > 0 and walls[2] > walls[1]
    by_route = {r["source"]: r for r in runs if r["staleness"] == "2" and r["seed"] == "0"}
    # Snapshot runs one forward per version in the batch: two at staleness 2 (tokens 2 and 3
    # versions old) once the learner is past version 3; one before, when the sampler's
    # versions are clamped at 0. The run mean therefore sits between 1 and 2.
    from jaxrl_async.metrics_log import read_metrics

    snap = [r for r in read_metrics(os.path.join(out, "cells", by_route["snapshot"]["cell"])) if "loss/policy" in r]
    assert [r["proximal/forward_passes"] for r in snap if r["step"] >= 3] == [2.0] * 3
    assert 1 < float(by_route["snapshot"]["proximal/forward_passes"]) < 2
    assert float(by_route["recompute"]["proximal/forward_passes"]) == 1
    assert float(by_route["bypass"]["proximal/forward_passes"]) == 0


@pytest.mark.slow
def test_rerun_skips_finished_cells_and_resumes_unfinished(smoke):
    out, cache = smoke
    before = open(os.path.join(out, "runs.csv")).read()
    result = experiments.run_sweep(SMOKE, out, workers=2, warmstart_cache=cache)
    assert (result["ran"], result["failed"]) == (0, [])
    assert open(os.path.join(out, "runs.csv")).read() == before
    # An unfinished cell (no summary) is rerun and resumes from its last checkpoint: the
    # metrics it had are kept, not appended to or recomputed from scratch.
    cid = "source=recompute__staleness=2__dtype=bf16__seed=1"
    workdir = os.path.join(out, "cells", cid)
    metrics_before = open(os.path.join(workdir, "metrics.jsonl")).read()
    os.remove(os.path.join(workdir, "summary.json"))
    result = experiments.run_sweep(SMOKE, out, workers=2, warmstart_cache=cache)
    assert (result["ran"], result["failed"]) == (1, [])
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == metrics_before
    assert os.path.exists(os.path.join(workdir, "summary.json"))


@pytest.mark.slow
def test_report_tables_cover_every_route(smoke, tmp_path):
    out, _ = smoke
    text = _squeeze(report.report(out, None, str(tmp_path / "report")))
    for route in report.ROUTE_ORDER:
        assert f"| {route} |" in text
    assert "Cost per route, sampler bf16, staleness 2" in text
    assert "Effective clip fraction (tokens without gradient), sampler bf16" in text
    for name in ("entanglement.png", "curves_bf16_step.png", "curves_bf16_learner_wall_s.png", "report.md"):
        assert os.path.getsize(tmp_path / "report" / name) > 0


@pytest.mark.slow
def test_report_cli(smoke, tmp_path):
    out, _ = smoke
    r = subprocess.run([sys.executable, "-m", "jaxrl_async.experiments.report", f"--routes={out}",
                        f"--thresholds={tmp_path / 'none'}", f"--out={tmp_path / 'report'}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (tmp_path / "report" / "report.md").read_text().strip()
    assert "| snapshot |" in _squeeze(r.stdout)


def _squeeze(text: str) -> str:
    """Markdown tables without their column padding: `| a     | b |` reads `| a | b |`."""
    return re.sub(r" {2,}", " ", text)


def _text(cell) -> str:
    return _squeeze("".join("".join(o.get("text", "")) for o in cell.get("outputs", [])
                            if o.get("output_type") == "stream"))


def _figures(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


# What each notebook must show, by cell tag: (text the cell prints, figures it draws).
EXPECTED_OUTPUTS = {
    "01_ratio_decomposition": {
        "token-table": (("token", "stale", "log r", "log w", "lp-behav"), 0),
        "split-table": (("exact", "recompute", "ratio/clip_frac", "is/truncated_frac", "mask/token_frac",
                         "ratio/effective_clip_frac", "mismatch/kl_k1"), 0),
        "split-figure": ((), 1),
    },
    "02_routes_and_costs": {
        "cost-table": (("| route | step s (sample + train) |",) + tuple(f"| {r} |" for r in report.ROUTE_ORDER), 0),
        "cost-figure": ((), 1),
    },
    "03_learning_curves": {
        "learning-table": (("sampler bf16:", "| route | s=0: final success | s=2: final success |",
                            "| snapshot |", "| recompute |"), 0),
        "curves-step": ((), 1),
        "curves-wall": ((), 1),
        "entanglement": (("| staleness | snapshot trunc / mask |",), 1),
        "threshold-table": (("no threshold-sweep results found",), 0),
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, smoke, tmp_path, monkeypatch):
    import nbclient
    import nbformat

    out, cache = smoke
    monkeypatch.setenv("JAXRL_RESULTS", out)
    monkeypatch.setenv("JAXRL_THRESHOLDS", str(tmp_path / "no_threshold_sweep"))
    monkeypatch.setenv("JAXRL_WARMSTART_CACHE", cache)
    monkeypatch.setenv("JAXRL_NB_STEPS", "6")
    monkeypatch.setenv("JAXRL_NB_WORKDIR", str(tmp_path / "run"))
    nb = nbformat.read(os.path.join(ROOT, "notebooks", f"{name}.ipynb"), as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    # The notebook's own first cell moves to the repository root.
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()  # raises on a cell's error
    cells = {tag: c for c in nb.cells for tag in c.metadata.get("tags", [])}
    for tag, (texts, figures) in EXPECTED_OUTPUTS[name].items():
        assert tag in cells, f"no cell tagged {tag!r} in {name}"
        text = _text(cells[tag])
        for expected in texts:
            assert expected in text, f"{name} [{tag}]: {expected!r} not in its output:\n{text}"
        assert _figures(cells[tag]) == figures, f"{name} [{tag}]: {_figures(cells[tag])} figures, expected {figures}"


def test_bootstrap_ci_golden_values_and_edge_cases():
    # Golden values of the seeded BCa bootstrap on a fixed symmetric sample (where BCa and the
    # percentile interval agree).
    ci = report.bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0], n_resamples=10_000, seed=0)
    assert (ci.estimate, ci.n) == (3.0, 5)
    assert (ci.low, ci.high) == pytest.approx((1.8, 4.2))
    assert report.bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0], seed=0) == ci  # reproducible
    assert report.bootstrap_ci([1.0, np.nan, 2.0, 3.0, np.inf, 4.0, 5.0], seed=0) == ci  # non-finite dropped
    assert ci.fmt(2) == "3.00 [1.80, 4.20]"
    assert report.bootstrap_ci([0.25], seed=0).fmt(1, pct=True) == "25.0% [25.0, 25.0]"
    one = report.bootstrap_ci([0.7])
    assert (one.estimate, one.low, one.high, one.n) == (0.7, 0.7, 0.7, 1)
    empty = report.bootstrap_ci([np.nan])
    assert empty.n == 0 and np.isnan(empty.estimate) and empty.fmt() == "n/a"
    med = report.bootstrap_ci([1.0, 2.0, 100.0], statistic=np.median, seed=0)
    assert med.estimate == 2.0 and 1.0 <= med.low <= med.high <= 100.0
    with pytest.raises(ValueError, match="level"):
        report.bootstrap_ci([1.0, 2.0], level=95)


def test_bootstrap_ci_covers_the_mean_of_a_known_distribution():
    # Coverage of the 95% interval for the mean of a normal sample of 30: the percentile bootstrap
    # under-covers a little at small n; over 400 samples it must land near 0.95.
    rng = np.random.default_rng(123)
    hits = 0
    for i in range(400):
        ci = report.bootstrap_ci(rng.normal(2.0, 1.0, size=30), n_resamples=2000, seed=i)
        hits += ci.low <= 2.0 <= ci.high
    assert 0.89 <= hits / 400 <= 0.98, hits / 400


def test_bootstrap_compare_pairs_seeds():
    a, b = np.array([10.0, 20.0, 30.0, 40.0]), np.array([11.0, 21.0, 31.0, 41.0])
    # Paired, the difference is exactly -1 in every resample; unpaired, the seed spread widens it.
    paired = report.bootstrap_compare(a, b, "diff", paired=True)
    assert (paired.estimate, paired.low, paired.high, paired.n) == pytest.approx((-1.0, -1.0, -1.0, 4))
    unpaired = report.bootstrap_compare(a, b, "diff", paired=False)
    assert unpaired.low < -5 and unpaired.high > 3
    ratio = report.bootstrap_compare(2 * b, b, "ratio")
    assert (ratio.estimate, ratio.low, ratio.high) == pytest.approx((2.0, 2.0, 2.0))
    dropped = report.bootstrap_compare([1.0, np.nan, 3.0], [1.0, 2.0, np.nan], "diff")
    assert dropped.n == 1 and dropped.estimate == 0.0
    with pytest.raises(ValueError, match="same length"):
        report.bootstrap_compare([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="kind"):
        report.bootstrap_compare([1.0], [1.0], "product")


def test_three_term_sweep_cells_and_routes():
    sweep = experiments.load_sweep(os.path.join(ROOT, "configs", "experiments", "three_term.py"))
    cells = experiments.expand(sweep)
    ids = [cid for cid, _ in cells]
    assert len(ids) == len(set(ids)) == 11 * 5  # 11 (route, setting) pairs x 5 seeds
    for cid, overrides in cells:
        config = experiments.cell_config(sweep, overrides, "")  # validates (an anchor needs an exact source)
        name = report.route_name(config.proximal.source, config.proximal.anchor)
        assert name in report.THREE_TERM_ORDER, cid
    assert "source=snapshot__anchor=recompute__staleness=8__dtype=int8__logit_noise_std=0.5__seed=4" in ids
    assert report.route_name("snapshot", None) == "exact" and report.route_name("snapshot", "None") == "exact"
    assert report.route_name("snapshot", "ewma") == "snapshot + ewma"


def test_stability_columns():
    import pandas as pd

    steps = pd.DataFrame({"perf/grad_norm": [1.0, 1.0, 1.2, 5.0, 0.9], "train/skipped_nonfinite": [0, 0, 1, 0, 0]})
    evals = pd.DataFrame({"step": [0, 5, 10, 15], "eval/success_rate": [0.2, 0.8, 0.5, 0.9]})
    out = experiments._stability(steps, evals)
    assert out["grad_norm_max"] == 5.0 and out["grad_norm_max_over_median"] == pytest.approx(5.0)
    assert out["grad_spikes"] == 1 and out["skipped_nonfinite"] == 1
    assert out["success_drawdown"] == pytest.approx(0.3)


def test_three_term_report_reads_the_committed_results(tmp_path):
    results = os.path.join(ROOT, report.COMMITTED_RESULTS, "three_term")
    if not os.path.exists(os.path.join(results, "runs.csv")):
        pytest.skip("no committed three-term results")
    text = _squeeze(report.three_term_report(results, str(tmp_path)))
    for name in ("recompute", "exact", "three-term"):
        assert f"| {name} |" in text
    assert "paired comparisons" in text and os.path.getsize(tmp_path / "curves.png") > 0


@pytest.mark.slow
def test_three_term_notebook_executes_on_the_committed_results(tmp_path):
    # Notebook 04 reads only the committed tables (docs/results/three_term) and carries its outputs.
    import nbclient
    import nbformat

    if not os.path.exists(os.path.join(ROOT, report.COMMITTED_RESULTS, "three_term", "runs.csv")):
        pytest.skip("no committed three-term results")
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "04_three_term.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    cells = {tag: c for c in nb.cells for tag in c.metadata.get("tags", [])}
    assert "| three-term |" in _text(cells["q1-table"]) and "| recompute |" in _text(cells["q2-table"])
    assert "ratio to exact" in _text(cells["q3-table"]) and "Q3:" in _text(cells["answers"])
    for tag in ("q1-figure", "q2-figure", "q3-figure", "curves"):
        assert _figures(cells[tag]) == 1, tag


def _bca_by_hand(x, n_resamples=40_000, level=0.95, seed=7):
    """The BCa interval of the mean from its textbook formulas (Efron 1987), with numpy's own resamples."""
    from scipy.special import ndtr, ndtri

    x = np.asarray(x, float)
    boot = x[np.random.default_rng(seed).integers(0, x.size, (n_resamples, x.size))].mean(axis=1)
    theta = x.mean()
    z0 = ndtri(((boot < theta).mean() + (boot <= theta).mean()) / 2)
    jack = np.array([np.delete(x, i).mean() for i in range(x.size)])
    d = jack.mean() - jack
    accel = (d ** 3).sum() / (6 * ((d ** 2).sum()) ** 1.5)
    z = ndtri([(1 - level) / 2, (1 + level) / 2])
    alphas = ndtr(z0 + (z0 + z) / (1 - accel * (z0 + z)))
    return np.quantile(boot, alphas)


def test_bootstrap_is_bca_on_skewed_seeds():
    # Five right-skewed per-seed values (one seed far out, as a collapse or a lucky run gives):
    # BCa shifts the interval towards the long tail, where the plain percentile interval does not.
    x = [0.1, 0.2, 0.3, 0.5, 3.0]
    ci = report.bootstrap_ci(x, n_resamples=10_000, seed=0)
    assert (ci.low, ci.high) == pytest.approx(tuple(_bca_by_hand(x)), abs=0.05)
    boot = np.asarray(x)[np.random.default_rng(0).integers(0, 5, (10_000, 5))].mean(axis=1)
    percentile = np.percentile(boot, [2.5, 97.5])
    assert ci.high > percentile[1] + 0.1  # shifted up by the skew
    # Paired: the per-seed differences carry the same skew, and the interval is theirs.
    b = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    diff = report.bootstrap_compare(np.asarray(x) + b, b, "diff", paired=True, seed=0)
    assert diff.estimate == pytest.approx(0.82)
    assert (diff.low, diff.high) == pytest.approx(tuple(_bca_by_hand(x)), abs=0.05)


def test_markdown_writes_cells_as_given():
    table = report.markdown(pd.DataFrame([["recompute", "0.800", "1.50% [1.45, 1.91]"], ["exact", "12", "n/a"]],
                                         columns=["route", "final success", "rejected"]))
    lines = table.splitlines()
    assert len(lines) == 4 and all(line.startswith("| ") and line.endswith(" |") for line in lines[::2])
    assert _squeeze(lines[0]) == "| route | final success | rejected |"
    assert _squeeze(lines[2]) == "| recompute | 0.800 | 1.50% [1.45, 1.91] |"  # not re-formatted as 0.8
