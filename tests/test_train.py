"""The trainer: config validation at startup, outputs, exact resume, and learning."""

import json
import os
import subprocess
import sys

import pytest

from jaxrl_async import config as config_lib
from jaxrl_async.metrics_log import read_metrics
from jaxrl_async.train import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(steps=4):
    c = config_lib.base_config()
    c.task.name = "search"
    c.task.kwargs.n = 8
    c.task.kwargs.max_turns = 4
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff = 32, 1, 2, 64
    c.rl.groups_per_step, c.rl.group_size = 4, 4
    c.warmstart.episodes, c.warmstart.steps, c.warmstart.batch_size = 64, 5, 16
    c.train.steps = steps
    c.train.eval_every = 2
    c.train.checkpoint_every = 2
    c.eval.episodes = 16
    return c


def test_validation_names_the_field():
    c = tiny_config()
    c.numerics.dtype = "fp8"
    with pytest.raises(ValueError, match=r"numerics\.dtype.*fp32"):
        config_lib.validate(c)
    c = tiny_config()
    c.loss.is_mode = "tokens"
    with pytest.raises(ValueError, match="is_mode"):
        train_and_evaluate(c, "/tmp/never_created_workdir_x")
    c = tiny_config()
    c.optim.num_minibatches = 3
    with pytest.raises(ValueError, match="num_minibatches"):
        config_lib.validate(c)
    c = tiny_config()
    c.model.max_len = 16
    with pytest.raises(ValueError, match="max_len"):
        train_and_evaluate(c, "/tmp/never_created_workdir_x")
    c = tiny_config()
    with c.unlocked():
        c.train.stepz = 3
    with pytest.raises(ValueError, match="stepz"):
        config_lib.validate(c)
    assert not os.path.exists("/tmp/never_created_workdir_x")


def test_cli_rejects_unknown_override_and_bad_value(tmp_path):
    base = [sys.executable, "-m", "jaxrl_async.train", "--config=configs/default.py", f"--workdir={tmp_path}"]
    r = subprocess.run(base + ["--config.train.stepz=3"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "stepz" in r.stderr
    r = subprocess.run(base + ["--config.rl.advantage=ppo"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "rl.advantage" in r.stderr and "grpo" in r.stderr
    assert "Traceback" not in r.stderr


def _comparable(rows):
    # Timings differ between runs; everything else must match exactly.
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "rollout/tokens_per_s"} for r in rows]


def test_outputs_and_resume_reproduces_uninterrupted_run(tmp_path):
    full = str(tmp_path / "full")
    summary = train_and_evaluate(tiny_config(4), full, progress=False)
    for name in ("metrics.jsonl", "summary.json", "learning_curve.png", "config.json", "demonstrations.npz"):
        assert os.path.exists(os.path.join(full, name)), name
    assert os.listdir(os.path.join(full, "tb"))
    assert summary["steps"] == 4
    for key in ("initial_success_rate", "final_success_rate", "steps", "wall_seconds"):
        assert key in json.load(open(os.path.join(full, "summary.json")))
    rows = read_metrics(full)
    assert [r["step"] for r in rows if "eval/success_rate" in r] == [0, 2, 4]
    assert [r["step"] for r in rows if "loss/policy" in r] == [0, 1, 2, 3]

    part = str(tmp_path / "part")
    train_and_evaluate(tiny_config(2), part, progress=False)
    resumed = train_and_evaluate(tiny_config(4), part, progress=False)  # same workdir: resumes at step 2
    assert resumed["steps"] == 4
    assert _comparable(read_metrics(part)) == _comparable(rows)
    assert resumed["final_success_rate"] == summary["final_success_rate"]


def test_inline_lag_and_partial_rollouts_set_staleness(tmp_path):
    c = tiny_config(4)
    c.runtime.lag, c.runtime.partial_rollout, c.runtime.switch_after = 2, True, 8
    c.sampler.chunk = 4
    c.warmstart.enabled = False
    train_and_evaluate(c, str(tmp_path), progress=False)
    rows = {r["step"]: r for r in read_metrics(str(tmp_path)) if "staleness/max" in r}
    # Step v samples with version max(v-3, 0) first, then switches to max(v-2, 0) mid-episode.
    assert [rows[v]["staleness/max"] for v in range(4)] == [0, 1, 2, 3]
    assert rows[0]["rollout/partial_frac"] == 0 and rows[1]["rollout/partial_frac"] == 0
    assert rows[3]["rollout/partial_frac"] > 0 and rows[3]["rollout/weight_switches"] == 1
    assert 2 <= rows[3]["staleness/mean"] <= 3


@pytest.mark.slow
def test_short_run_improves_success_on_easy_task(tmp_path):
    c = config_lib.base_config()
    c.task.name = "tooluse_easy"
    c.rl.groups_per_step, c.rl.group_size = 8, 8
    c.warmstart.episodes, c.warmstart.steps = 2048, 400
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 30, 30, 30
    c.eval.episodes = 128
    s = train_and_evaluate(c, str(tmp_path), progress=False)
    assert s["initial_success_rate"] <= 0.5
    assert s["final_success_rate"] >= s["initial_success_rate"] + 0.2


def test_warmstart_cache_is_shared_across_runs(tmp_path):
    c = tiny_config(1)
    c.warmstart.cache_dir = str(tmp_path / "cache")
    c.train.eval_every = 1
    a = train_and_evaluate(c, str(tmp_path / "a"), progress=False)
    entries = os.listdir(c.warmstart.cache_dir)
    assert len(entries) == 1
    c.loss.clip_high = 0.28  # a setting after the warm start: same cache entry
    b = train_and_evaluate(c, str(tmp_path / "b"), progress=False)
    assert os.listdir(c.warmstart.cache_dir) == entries
    assert not os.path.exists(str(tmp_path / "b" / "demonstrations.npz"))  # served from the cache
    assert b["initial_success_rate"] == a["initial_success_rate"]
    assert b["warmstart"] == a["warmstart"]
    c.warmstart.steps += 1  # a warm-start setting: a new entry
    train_and_evaluate(c, str(tmp_path / "c"), progress=False)
    assert len(os.listdir(c.warmstart.cache_dir)) == 2


def test_unwritable_workdir_fails_at_startup(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="not writable"):
        train_and_evaluate(tiny_config(), str(blocker / "run"))
