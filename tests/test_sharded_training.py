"""The whole training loop, black box: `qwen3_tiny` on learner meshes of 8 CPU devices.

Every run starts from the same warm-started params (a short warm start, computed once and shared
through `warmstart.cache_dir`), so the first RL steps have groups with non-zero advantages. On
meshes (data, fsdp, tensor) = (2, 2, 2) and (1, 8, 1) the logged `loss/policy` and
`perf/grad_norm` of steps 0 and 1 equal those of one device: the sampler, the queue, the
proximal route and the metrics are untouched by the learner's sharding. One fresh process with
`--xla_force_host_platform_device_count=8` runs the three trainings in turn.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # three short trainings of a 2-layer Qwen3 on 8 host devices: about 95 s

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import importlib.util, json, os, sys, time
import jax
from jaxrl_async.train import train_and_evaluate
from jaxrl_async import metrics_log

assert len(jax.devices()) == 8, jax.devices()
root = sys.argv[1]
# The three runs compile the same sampler and evaluation programs (only the update is per mesh): the
# persistent cache compiles them once.
jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# configs/qwen3_tiny_proxy.py's task and warm start (qwen3_tiny's model, a number in [0, 4) in 3 turns, a
# fast warm start): its first groups hold both solved and failed episodes (returns near 0.4), so the RL
# gradients are not zero. Trained here by the inline runtime.
spec = importlib.util.spec_from_file_location("qwen3_tiny_proxy", "configs/qwen3_tiny_proxy.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
out = {}
for shape in ((1, 1, 1), (2, 2, 2), (1, 8, 1)):
    c = module.get_config()
    c.runtime.mode = "inline"
    c.runtime.num_samplers = 1
    c.warmstart.cache_dir = os.path.join(root, "warmstart")
    c.rl.groups_per_step = 2
    c.train.steps = 2
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.eval.episodes = 16  # the RL batch's episode count: evaluation decodes with the same shapes
    c.parallel.data, c.parallel.fsdp, c.parallel.tensor = shape
    workdir = os.path.join(root, "x".join(map(str, shape)))
    os.makedirs(workdir)
    t = time.perf_counter()
    train_and_evaluate(c, workdir, progress=False)
    print(shape, f"{time.perf_counter() - t:.1f} s", file=sys.stderr)  # in the failure output if one fails
    rows = [r for r in metrics_log.read_metrics(workdir) if "loss/policy" in r]
    keys = ("step", "loss/policy", "perf/grad_norm", "rollout/return_mean", "rollout/episode_tokens_mean")
    out[str(shape)] = [{k: r[k] for k in keys} for r in rows]
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = str(tmp_path_factory.mktemp("sharded_training"))
    r = subprocess.run([sys.executable, "-c", SCRIPT, root], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")][0]
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("shape", ["(2, 2, 2)", "(1, 8, 1)"])
def test_sharded_training_logs_the_one_device_losses(runs, shape):
    one, many = runs["(1, 1, 1)"], runs[shape]
    assert [r["step"] for r in one] == [r["step"] for r in many] == [0, 1]
    # The warm start left groups that disagree: the losses below come from real gradients.
    assert all(r["perf/grad_norm"] > 1e-3 and 0 < r["rollout/return_mean"] < 1 for r in one), one
    for a, b in zip(one, many):
        for k in ("rollout/return_mean", "rollout/episode_tokens_mean"):  # the same episodes were trained on
            assert b[k] == a[k], (shape, a["step"], k)
        for k in ("loss/policy", "perf/grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-3), (shape, a["step"], k)
