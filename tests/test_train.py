"""The trainer: config validation at startup, outputs, exact resume, and learning."""

import json
import os
import subprocess
import sys

import pytest

from jaxrl_async import config as config_lib
from jaxrl_async.cluster import ConfigError, check_startup
from jaxrl_async.metrics_log import read_metrics
from jaxrl_async.train import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_validation_names_the_field(tiny_config, tmp_path):
    workdir = tmp_path / "never_created"
    c = tiny_config()
    c.numerics.dtype = "fp8"
    with pytest.raises(ValueError, match=r"numerics\.dtype.*fp32"):
        config_lib.validate(c)
    c = tiny_config()
    c.loss.is_mode = "tokens"
    with pytest.raises(ValueError, match="is_mode"):
        train_and_evaluate(c, str(workdir))
    c = tiny_config()
    c.optim.num_minibatches = 3
    with pytest.raises(ValueError, match="num_minibatches"):
        config_lib.validate(c)
    c = tiny_config()
    c.model.max_len = 16
    with pytest.raises(ValueError, match="max_len"):
        train_and_evaluate(c, str(workdir))
    for bad in (-1, True, 1 << 30):  # 1 << 30: more buckets than model.max_len
        c = tiny_config()
        c.learner.length_buckets = bad
        with pytest.raises(ValueError, match=r"learner\.length_buckets"):
            config_lib.validate(c)
    c = tiny_config()
    with c.unlocked():
        c.train.stepz = 3
    with pytest.raises(ValueError, match="stepz"):
        config_lib.validate(c)
    assert not workdir.exists()  # config errors are raised before the workdir is created


@pytest.mark.parametrize("field, value, match", [
    ("loss.is_mode", "tokens", "is_mode"),  # checked by LossConfig
    ("proximal.source", "snapshots", r"proximal\.source"),  # checked by config.validate
    ("model.max_len", 16, "max_len"),  # checked against the task's longest episode
    ("task.name", "chess", "chess"),  # checked by building the task once
])
def test_check_startup_names_the_field_and_creates_no_workdir(tiny_config, tmp_path, field, value, match):
    c = tiny_config()
    section, key = field.split(".")
    c[section][key] = value
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        check_startup(c, str(workdir))
    assert not workdir.exists()


def test_check_startup_accepts_a_good_config_and_probes_the_workdir(tiny_config, tmp_path):
    workdir = tmp_path / "run"
    check_startup(tiny_config(), str(workdir))
    assert workdir.is_dir() and os.listdir(workdir) == []  # the write probe is removed again
    assert issubclass(ConfigError, ValueError)  # callers catching ValueError keep working


def test_cli_rejects_unknown_override_and_bad_value(tmp_path):
    base = [sys.executable, "-m", "jaxrl_async.train", "--config=configs/default.py", f"--workdir={tmp_path}"]
    r = subprocess.run(base + ["--config.train.stepz=3"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "stepz" in r.stderr
    r = subprocess.run(base + ["--config.rl.advantage=ppo"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "rl.advantage" in r.stderr and "grpo" in r.stderr
    assert "Traceback" not in r.stderr


def test_outputs_and_resume_reproduces_uninterrupted_run(tmp_path, tiny_config, comparable_metrics):
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
    assert comparable_metrics(read_metrics(part)) == comparable_metrics(rows)
    assert resumed["final_success_rate"] == summary["final_success_rate"]


def test_inline_lag_and_partial_rollouts_set_staleness(tmp_path, tiny_config):
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


def test_warmstart_cache_is_shared_across_runs(tmp_path, tiny_config):
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


def test_unwritable_workdir_fails_at_startup(tmp_path, tiny_config):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="not writable"):
        train_and_evaluate(tiny_config(), str(blocker / "run"))


# Float fields are not listed: ConfigDict itself turns `True` assigned to a float field into 1.0.
@pytest.mark.parametrize("field", ["train.steps", "warmstart.episodes", "runtime.lag", "runtime.max_staleness",
                                   "parallel.num_devices", "proximal.staleness_window"])
def test_booleans_are_not_numbers(tiny_config, field):
    c = tiny_config()
    section, key = field.split(".")
    c[section][key] = True  # bool is a subclass of int: `True` must not pass as 1
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        config_lib.validate(c)


def test_another_configs_run_in_the_workdir_is_named_not_called_corrupt(tmp_path, tiny_config):
    from jaxrl_async.cluster import RLCluster

    workdir = str(tmp_path / "run")
    c = tiny_config(1)
    c.warmstart.enabled = False
    cluster = RLCluster(c, workdir, log=lambda *a: None)
    try:
        cluster.save(1)
    finally:
        cluster.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(c.to_json(indent=2))
    other = tiny_config(1)
    other.warmstart.enabled = False
    other.model.d_model, other.loss.clip_high = 64, 0.28
    logs = []
    with pytest.raises(ConfigError) as e:
        RLCluster(other, workdir, log=logs.append)
    msg = str(e.value)
    assert "model.d_model: 32 -> 64" in msg and "loss.clip_high: 0.2 -> 0.28" in msg
    assert "--noresume" in msg and "--workdir" in msg and len(msg.splitlines()) <= 8
    assert "corrupt" not in msg + "".join(logs)
    assert os.listdir(os.path.join(workdir, "checkpoints")) and not os.path.exists(
        os.path.join(workdir, "checkpoints.corrupt"))  # nothing set aside
    # A workdir without config.json (an older run): the checkpoint's shapes give it away, in a few lines.
    os.remove(os.path.join(workdir, "config.json"))
    with pytest.raises(ConfigError, match=r"(?s)another config.*--noresume") as e:
        RLCluster(other, workdir, log=logs.append)
    assert len(str(e.value).splitlines()) <= 8 and len(str(e.value)) < 2000
    assert "corrupt" not in "".join(logs) and not os.path.exists(os.path.join(workdir, "checkpoints.corrupt"))
    # Settings that do not change the train state's shapes resume, with a note of what changed.
    c.loss.clip_high = 0.28
    cluster = RLCluster(c, workdir, log=logs.append)
    cluster.close()
    assert cluster.start_step == 1
