"""Data parallelism: 1, 2 and 4 devices give the same loss, metrics, gradients and update; a
checkpoint written on one mesh restores on another; a sampler on its own tensor-parallel mesh
decodes the same episodes as on one device.

JAX fixes its device count at start-up, so the 4-device run happens in a fresh process
with `XLA_FLAGS=--xla_force_host_platform_device_count=4`.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jaxrl_async.learner import mesh as parallel, update as L
from jaxrl_async.models import transformer as M
from jaxrl_async.core.losses import LossConfig, policy_loss
from jaxrl_async.rollout.trajectory import Batch

assert len(jax.devices()) == 4, jax.devices()
cfg = M.ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=32)
graphdef, params = M.init_model(cfg, 0)
rng = np.random.default_rng(0)
B, T = 16, 32
tokens = rng.integers(4, 40, (B, T)).astype(np.int32)
# Very uneven valid-token counts across the 4 shards of 4 rows: 29, 19, 4 and 0 per row.
lengths = np.repeat([30, 20, 5, 1], 4)
mask = (np.arange(T)[None] < lengths[:, None]) & (np.arange(T)[None] > 0)
logp0 = np.asarray(M.token_logprobs(graphdef, params, jnp.asarray(tokens)))
batch = {
    "tokens": tokens, "loss_mask": mask, "versions": np.where(mask, 0, -1).astype(np.int32),
    "behav_logp": (logp0 + rng.normal(0, 0.3, (B, T))).astype(np.float32),
    "prox_logp": (logp0 + rng.normal(0, 0.2, (B, T))).astype(np.float32),
    "advantages": np.where(mask, rng.normal(0, 1, (B, 1)), 0).astype(np.float32),
}
out = {}
for agg in ("token_mean", "seq_mean_token_mean"):
    loss_config = LossConfig(aggregation=agg, token_mask=(0.5, 2.0), clip_high=0.28)
    for n in (1, 2, 4):
        mesh = parallel.make_mesh(n)
        sb = parallel.shard_rows(Batch(**batch), mesh)
        opt = L.make_optimizer(1e-2, 1.0)
        # A copy: the update donates the state, and on one device replicate() may not copy.
        state = parallel.replicate(L.create_train_state(jax.tree.map(jnp.copy, params), opt, ewma=True), mesh)

        def loss_fn(p):
            logp = M.token_logprobs(graphdef, p, sb.tokens)
            return policy_loss(logp, sb.prox_logp, sb.behav_logp, sb.advantages, sb.loss_mask, loss_config)

        (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params)
        update = L.make_rl_update(graphdef, opt, loss_config, num_minibatches=2)
        new_state, update_metrics = update(state, sb, jax.random.key(0), 0.9)
        out[f"{agg}/{n}"] = {
            "devices": len(sb.tokens.sharding.device_set),
            "loss": float(loss),
            "metrics": {k: float(v) for k, v in metrics.items()},
            "grads": [np.asarray(g).ravel().tolist() for g in jax.tree.leaves(grads)],
            "params": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(new_state.params)],
            "ewma": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(new_state.ewma)],
            "update_metrics": {k: float(v) for k, v in update_metrics.items()},
        }
# The snapshot route's per-version forwards on the mesh: rows sharded over the devices,
# the same old log-probs as on one device. Three versions, one of them on 3 rows only.
from jaxrl_async.learner.route import snapshot_logp
versions_arr = np.where(mask, np.repeat([0, 1, 2, 2], 4)[:, None], -1).astype(np.int32)
versions_arr[3] = np.where(mask[3], 1, -1)
by_version = {v: jax.tree.map(lambda x, v=v: x * (1 + 0.01 * v), params) for v in range(3)}
snap = {}
for n in (1, 4):
    mesh = parallel.make_mesh(n)
    shardings = []

    def logprob_fn(p, t, mesh=mesh, shardings=shardings):
        t = parallel.shard_rows({"t": t}, mesh)["t"]
        shardings.append(len(t.sharding.device_set))
        return M.token_logprobs(graphdef, parallel.replicate(p, mesh), t)

    old_lp, _, passes, _ = snapshot_logp(logprob_fn, by_version.__getitem__, tokens, versions_arr, mask,
                                                  row_multiple=n)
    snap[str(n)] = {"old": old_lp.ravel().tolist(), "devices": shardings, "passes": passes}
# The same with each version split over (fsdp 2, tensor 2) as the learner's params are (route.mesh_logprob_fn).
from jaxrl_async.learner.route import mesh_logprob_fn
mesh = parallel.make_mesh(data=1, fsdp=2, tensor=2)
from jaxrl_async.models.sharding import param_shardings
split = param_shardings(M.param_axes(params), params, mesh)
placed = []
def split_logp(p, t):
    placed.append(max(len(x.sharding.device_set) for x in jax.tree.leaves(p)))
    placed.append(sorted({str(x.sharding.spec) for x in jax.tree.leaves(p)}))
    return M.token_logprobs(graphdef, p, t)
old_lp, _, passes, _ = snapshot_logp(mesh_logprob_fn(split_logp, mesh, split), by_version.__getitem__, tokens,
                                     versions_arr, mask, row_multiple=4)
snap["split"] = {"old": old_lp.ravel().tolist(), "passes": passes, "placed": placed}
out["snapshot"] = snap
# A checkpoint saved on one mesh restores on another: written split over (fsdp 2, tensor 2), restored
# into a train state placed on (data 1, fsdp 4, tensor 1) and into one on a single device.
import tempfile
from jaxrl_async.learner.checkpoints import Checkpoints
axes = M.param_axes(params)
opt = L.make_optimizer(1e-2, 1.0)
def split_state(shape, scale):
    mesh = parallel.make_mesh(data=shape[0], fsdp=shape[1], tensor=shape[2])
    p = jax.tree.map(lambda x: x * scale, params)
    return parallel.sharded_train_state(p, opt, mesh, axes, ewma=True)
saved, _ = split_state((1, 2, 2), 2.0)
ckpt = {}
with tempfile.TemporaryDirectory() as d:
    c = Checkpoints(d, 2)
    c.save(3, saved, {"epoch": 0})
    for shape in ((1, 4, 1), (1, 1, 1)):
        target, target_sharding = split_state(shape, 1.0)  # other values: the restore must overwrite them
        step, back, meta = c.restore_latest(target)
        leaves, want = jax.tree.leaves(back.params), jax.tree.leaves(saved.params)
        ckpt[str(shape)] = {
            "step": step,
            "equal": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(leaves, want)),
            "placed": all(x.sharding.is_equivalent_to(s, x.ndim)
                          for x, s in zip(leaves, jax.tree.leaves(target_sharding.params))),
            "devices": max(len(x.sharding.device_set) for x in leaves),
            "saved_specs": sorted({str(x.sharding.spec) for x in want}),
            "specs": sorted({str(x.sharding.spec) for x in leaves}),
        }
    c.close()
out["checkpoint"] = ckpt
# The sampler on its own tensor-parallel mesh (no fsdp): the same episodes as on one device. Heads 4 and
# kv heads 2: tensor 2 splits the weights and the KV cache.
from jaxrl_async.envs import make_env
from jaxrl_async.envs.tokenizer import TOKENIZER
from jaxrl_async.models import llama
from jaxrl_async.models.transformer import Numerics
from jaxrl_async.rollout.sampler import Sampler
lcfg = llama.LlamaConfig(vocab_size=TOKENIZER.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim_=8, qk_norm=True, max_len=64)
lgraph, lparams = llama.init_model(lcfg, 0)
samp = {}
for t in (1, 2):
    mesh = None if t == 1 else parallel.make_mesh(data=1, fsdp=1, tensor=t)
    sampler = Sampler(lgraph, lcfg, Numerics("fp32"), mesh=mesh)
    sampler.update_params(lparams, 0)
    envs = [make_env("search", n=8, max_turns=3) for _ in range(8)]
    trajs, _ = sampler.generate(envs, list(range(8)), [i // 2 for i in range(8)], jax.random.key(3), chunk=8)
    samp[str(t)] = {
        "tokens": [tr.tokens.tolist() for tr in trajs], "behav": [tr.behav_logp.tolist() for tr in trajs],
        "weight_devices": max(len(x.sharding.device_set) for x in jax.tree.leaves(sampler.inf_params)),
        "weight_specs": sorted({str(x.sharding.spec) for x in jax.tree.leaves(sampler.inf_params)
                                if hasattr(x.sharding, "spec")}),
    }
out["sampler"] = samp
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")][0]
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("n", [2, 4])
def test_n_devices_equal_one_device(results, agg, n):
    one, many = results[f"{agg}/1"], results[f"{agg}/{n}"]
    assert many["devices"] == n and one["devices"] == 1  # the batch really was split
    assert many["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)
    assert one["loss"] != 0.0
    for k, v in one["metrics"].items():
        assert many["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    for a, b in zip(many["grads"], one["grads"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for key in ("params", "ewma"):
        for a, b in zip(many[key], one[key]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for k, v in one["update_metrics"].items():
        assert many["update_metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_snapshot_forwards_run_on_the_mesh(results):
    one, four = results["snapshot"]["1"], results["snapshot"]["4"]
    assert one["passes"] == four["passes"] == 3
    assert four["devices"] == [4, 4, 4]  # every version's rows split over the 4 devices
    np.testing.assert_allclose(four["old"], one["old"], rtol=1e-5, atol=1e-5)
    assert np.count_nonzero(one["old"]) > 0
    split = results["snapshot"]["split"]  # each version split like the learner's params, not replicated
    assert split["passes"] == 3
    assert split["placed"][0] == 4 and any("tensor" in s for s in split["placed"][1])
    np.testing.assert_allclose(split["old"], one["old"], rtol=1e-5, atol=1e-5)


def test_checkpoint_saved_on_one_mesh_restores_on_another(results):
    ckpt = results["checkpoint"]
    for shape, devices in (("(1, 4, 1)", 4), ("(1, 1, 1)", 1)):
        got = ckpt[shape]
        assert got["step"] == 3 and got["equal"], got
        assert got["placed"] and got["devices"] == devices, got  # in the target's placement, not the saved one
        assert got["specs"] != got["saved_specs"], got


def test_tensor_parallel_sampler_gives_the_one_device_episodes(results):
    one, many = results["sampler"]["1"], results["sampler"]["2"]
    assert many["weight_devices"] == 2 and any("tensor" in s for s in many["weight_specs"])
    assert many["tokens"] == one["tokens"]
    assert sum(len(x) for x in one["tokens"]) > 8 * 20  # episodes of several turns
    for a, b in zip(many["behav"], one["behav"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_training_runs_data_parallel_on_four_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "jaxrl_async.train", "--config=configs/stale_bf16.py", f"--workdir={tmp_path}",
           "--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
           "--config.model.d_ff=64", "--config.rl.groups_per_step=4", "--config.rl.group_size=4",
           "--config.warmstart.enabled=False", "--config.eval.episodes=16", "--config.train.steps=3",
           "--config.train.eval_every=3", "--config.train.checkpoint_every=3", "--config.parallel.num_devices=4"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [json.loads(x) for x in open(os.path.join(tmp_path, "metrics.jsonl")) if "loss/policy" in x]
    assert len(rows) == 3 and all(np.isfinite(row["loss/policy"]) for row in rows)
    assert rows[-1]["proximal/forward_passes"] >= 1  # snapshot ran beside the sharded update
    r = subprocess.run(cmd[:-1] + ["--config.parallel.num_devices=3"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode != 0 and "split evenly" in r.stderr
