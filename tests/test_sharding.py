"""The sharded learner: logical axes, mesh rules, and FSDP / tensor-parallel updates on 8 CPU devices.

An RL update on a fixed batch gives the same params on one device (no mesh) and on the
(data, fsdp, tensor) meshes (1, 8, 1), (2, 4, 1) and (2, 2, 2); the train state one device
holds shrinks with fsdp; a sharded learner's params publish to the version store whole.
JAX fixes its device count at start-up, so the mesh runs happen in a fresh process with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (as tests/test_mesh.py does).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys, tempfile
import jax, jax.numpy as jnp, numpy as np
from jaxrl_async.learner import mesh as parallel, update as L
from jaxrl_async.models import llama, transformer
from jaxrl_async.core.losses import LossConfig
from jaxrl_async.rollout.trajectory import Batch
from jaxrl_async.runtime.versions import VersionStore

assert len(jax.devices()) == 8, jax.devices()
B, T = 16, 16
families = {
    # Qwen3-style (GQA, q/k norms) with Qwen2's q/k/v biases: every kind of parameter.
    "llama": (llama, llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                       num_heads=4, num_kv_heads=2, head_dim_=16, qk_norm=True, qkv_bias=True,
                                       max_len=T, logprob_chunk=8)),
    "transformer": (transformer, transformer.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4,
                                                         d_ff=64, max_len=T)),
    # Scanned layers: every layer parameter stacked on a leading `layers` axis, AdamW's moments too.
    "llama_scan": (llama, llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                            num_heads=4, num_kv_heads=2, head_dim_=16, qk_norm=True, max_len=T,
                                            logprob_chunk=8, scan_layers=True, remat=True)),
}
meshes = {"llama": [None, (1, 8, 1), (2, 4, 1), (2, 2, 2)], "transformer": [None, (2, 2, 2)],
          "llama_scan": [None, (2, 2, 2)]}
out = {}
for name, (module, cfg) in families.items():
    graphdef, params = module.init_model(cfg, 0)
    axes = module.param_axes(params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, (B, T)).astype(np.int32)
    lengths = np.repeat([16, 11, 6, 3], 4)
    mask = (np.arange(T)[None] < lengths[:, None]) & (np.arange(T)[None] > 0)
    logp0 = np.asarray(module.token_logprobs(graphdef, params, jnp.asarray(tokens)))
    batch = Batch(tokens=tokens, loss_mask=mask, versions=np.where(mask, 0, -1).astype(np.int32),
                  behav_logp=(logp0 + rng.normal(0, 0.3, (B, T))).astype(np.float32),
                  prox_logp=(logp0 + rng.normal(0, 0.2, (B, T))).astype(np.float32),
                  advantages=np.where(mask, rng.normal(0, 1, (B, 1)), 0).astype(np.float32))
    for shape in meshes[name]:
        opt = L.make_optimizer(1e-3, 1.0)
        state = L.create_train_state(jax.tree.map(jnp.copy, params), opt, ewma=True)
        if shape is None:  # one device, no mesh: the reference
            mesh = sharding = None
            state, sb = jax.device_put((state, batch), jax.devices()[0])
        else:
            mesh = parallel.make_mesh(data=shape[0], fsdp=shape[1], tensor=shape[2])
            sharding = parallel.state_shardings(state, mesh, axes)
            state, sb = jax.device_put(state, sharding), parallel.shard_rows(batch, mesh)
        before = parallel.bytes_per_device((state.params, state.opt_state, state.ewma))
        update = L.make_rl_update(graphdef, opt, LossConfig(clip_high=0.28), num_minibatches=2, model=module,
                                  mesh=mesh, state_sharding=sharding)
        new, metrics = update(state, sb, jax.random.key(0), 0.9)
        key = f"{name}/{shape}"
        leaves = jax.tree.leaves(new.params)
        out[key] = {
            "state_bytes": before,
            "state_bytes_after": parallel.bytes_per_device((new.params, new.opt_state, new.ewma)),
            "devices": len(leaves[0].sharding.device_set),
            "specs": sorted({str(x.sharding.spec) for x in leaves if hasattr(x.sharding, "spec")}),
            "moment_specs": sorted({str(x.sharding.spec) for x in jax.tree.leaves(new.opt_state)
                                    if hasattr(x.sharding, "spec") and x.ndim >= 2}),
            "metrics": {k: float(v) for k, v in metrics.items()},
            "params": [np.asarray(x).ravel().tolist() for x in leaves],
            "ewma": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(new.ewma)],
        }
        if name == "llama" and shape == (2, 2, 2):
            # Publishing a sharded learner's params: the ring buffer writes and reads them back whole.
            with tempfile.TemporaryDirectory() as d:
                store = VersionStore(d, 2, params, writer=True)
                store.publish(1, new.params)
                reader = VersionStore(d, 2, params, cache_size=0)
                back = reader.get(1)
                out["published_equal"] = all(np.array_equal(np.asarray(a), np.asarray(b))
                                             for a, b in zip(jax.tree.leaves(back), leaves))
                store.close()
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")][0]
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("key", ["llama/(1, 8, 1)", "llama/(2, 4, 1)", "llama/(2, 2, 2)", "transformer/(2, 2, 2)",
                                 "llama_scan/(2, 2, 2)"])
def test_sharded_update_equals_one_device(results, key):
    family = key.split("/")[0]
    one, many = results[f"{family}/None"], results[key]
    assert one["devices"] == 1 and many["devices"] == 8
    assert one["metrics"]["loss/policy"] != 0.0 and one["metrics"]["train/skipped_nonfinite"] == 0.0
    for k, v in one["metrics"].items():
        assert many["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    for field in ("params", "ewma"):
        for a, b in zip(many[field], one[field]):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    # The update moved the params (they left their EWMA behind): the equality is not of unchanged copies.
    assert max(np.abs(np.subtract(a, b)).max() for a, b in zip(one["params"], one["ewma"])) > 1e-5


def test_params_and_optimizer_state_are_split(results):
    assert results["llama/None"]["specs"] == []  # one device: no mesh at all
    fsdp = results["llama/(1, 8, 1)"]
    assert "P('fsdp',)" in fsdp["specs"] and "P(None, 'fsdp')" in fsdp["specs"]
    tp = results["llama/(2, 2, 2)"]
    assert {"P('fsdp', 'tensor')", "P('tensor', 'fsdp')"} <= set(tp["specs"])
    # AdamW's moments are split like their params, not replicated.
    assert set(fsdp["moment_specs"]) <= set(fsdp["specs"]) and "P()" not in fsdp["moment_specs"]
    assert set(tp["moment_specs"]) <= set(tp["specs"])
    # Stacked layer weights keep their `layers` axis whole and split the rest (flax issue 5112's
    # trap, an optimizer state that loses the stacked axis, does not arise: optax sees plain arrays).
    scan = results["llama_scan/(2, 2, 2)"]
    assert "P(None, 'fsdp', 'tensor')" in scan["specs"] and "P(None, 'fsdp', 'tensor')" in scan["moment_specs"]


@pytest.mark.parametrize("key,ways", [("llama/(1, 8, 1)", 8), ("llama/(2, 4, 1)", 4), ("llama/(2, 2, 2)", 4)])
def test_state_bytes_per_device_shrink_with_the_split(results, key, ways):
    whole, part = results["llama/None"]["state_bytes"], results[key]
    # Vectors (norm scales, q/k/v biases: 7% of this tiny model, ~0.01% of a real one) are not split
    # over fsdp; everything else is split `ways` ways.
    assert whole / ways <= part["state_bytes"] <= 1.15 * whole / ways, (whole, part["state_bytes"])
    assert part["state_bytes_after"] == part["state_bytes"]  # the update keeps the state where it was


def test_sharded_params_publish_whole(results):
    assert results["published_equal"] is True


@pytest.mark.slow
def test_process_runtime_trains_with_a_sharded_learner(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "jaxrl_async.train", "--config=configs/process.py", f"--workdir={tmp_path}",
           "--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
           "--config.model.d_ff=64", "--config.rl.groups_per_step=4", "--config.rl.group_size=4",
           "--config.runtime.sampler_groups=2", "--config.proximal.source=snapshot",
           "--config.warmstart.enabled=False", "--config.eval.episodes=16", "--config.train.steps=2",
           "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
           "--config.parallel.fsdp=2", "--config.parallel.tensor=2"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "learner mesh {'data': 1, 'fsdp': 2, 'tensor': 2}: memory/state_bytes_per_device" in r.stdout
    rows = [json.loads(x) for x in open(os.path.join(tmp_path, "metrics.jsonl")) if "loss/policy" in x]
    assert len(rows) == 2 and all(np.isfinite(row["loss/policy"]) for row in rows)
    assert rows[-1]["proximal/forward_passes"] >= 1  # snapshot forwards of published (sharded) versions
    bad = [c for c in cmd if not c.startswith("--config.parallel")] + ["--config.parallel.data=3",
                                                                        "--config.parallel.fsdp=2"]
    r = subprocess.run(bad, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "config.parallel.data * fsdp * tensor = 3 * 2 * 1 = 6 devices" in r.stderr
