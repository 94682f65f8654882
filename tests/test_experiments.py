"""The experiment runner, the report, and the notebooks, on the seconds-long smoke sweep.

One smoke sweep per module (14 tiny cells on 2 workers) serves every test here: the
tables it writes, the rerun that skips finished cells, the resume of an unfinished one,
the report, and the three notebooks, which CI executes top to bottom against it.
"""

import argparse
import csv
import json
import os

import numpy as np
import pytest

from jaxrl_async.experiments import report, sweep as experiments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "experiments", "smoke.py")
NOTEBOOKS = ("01_ratio_decomposition", "02_routes_and_costs", "03_learning_curves")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    base = tmp_path_factory.mktemp("experiments")
    out, cache = str(base / "smoke"), str(base / "warmstart_cache")
    experiments.main([f"--sweep={SMOKE}", f"--out={out}", f"--warmstart_cache={cache}", "--workers=2"])
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
        experiments.main([f"--sweep={sweep_file}", f"--out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()
    sweep_file.write_text(f"exec(open({SMOKE!r}).read())\n"
                          "def get_sweep():\n    return [{'numerics.dtype': ('fp8',), 'seed': (0,)}]\n")
    with pytest.raises(SystemExit, match=r"numerics\.dtype"):
        experiments.main([f"--sweep={sweep_file}", f"--out={tmp_path / 'out'}"])


def test_steps_to_target_interpolates_between_evaluations():
    curve = [{"step": 0, "success": 0.2, "learner_wall_s": 0.0}, {"step": 10, "success": 0.6, "learner_wall_s": 5.0},
             {"step": 20, "success": 1.0, "learner_wall_s": 9.0}]
    assert report.steps_to_target(curve, 0.8) == pytest.approx(15.0)
    assert report.steps_to_target(curve, 0.8, "learner_wall_s") == pytest.approx(7.0)
    assert report.steps_to_target(curve, 0.1) == 0.0
    assert np.isnan(report.steps_to_target(curve, 1.1))


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
    ns = argparse.Namespace(sweep=SMOKE, out=out, warmstart_cache=cache, workers=2)
    result = experiments.run_sweep(ns)
    assert (result["ran"], result["failed"]) == (0, [])
    assert open(os.path.join(out, "runs.csv")).read() == before
    # An unfinished cell (no summary) is rerun and resumes from its last checkpoint: the
    # metrics it had are kept, not appended to or recomputed from scratch.
    cid = "source=recompute__staleness=2__dtype=bf16__seed=1"
    workdir = os.path.join(out, "cells", cid)
    metrics_before = open(os.path.join(workdir, "metrics.jsonl")).read()
    os.remove(os.path.join(workdir, "summary.json"))
    result = experiments.run_sweep(ns)
    assert (result["ran"], result["failed"]) == (1, [])
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == metrics_before
    assert os.path.exists(os.path.join(workdir, "summary.json"))


@pytest.mark.slow
def test_report_tables_cover_every_route(smoke, tmp_path):
    out, _ = smoke
    text = report.report(out, None, str(tmp_path / "report"))
    for route in report.ROUTE_ORDER:
        assert f"| {route} |" in text
    assert "Cost per route, sampler bf16, staleness 2" in text
    assert "Effective clip fraction (tokens without gradient), sampler bf16" in text
    for name in ("entanglement.png", "curves_bf16_step.png", "curves_bf16_learner_wall_s.png", "report.md"):
        assert os.path.getsize(tmp_path / "report" / name) > 0


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
                            resources={"metadata": {"path": ROOT}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
