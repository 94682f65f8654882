"""Several processes: an RL update on 2 processes x 4 CPU devices equals one device.

Two fresh processes join one JAX job through `learner.mesh.initialize_distributed`
(`JAX_COORDINATOR_ADDRESS`, a free local port; gloo collectives between the CPU devices)
and run the sharded update of tests/test_sharding.py on meshes spanning all 8 devices,
each process feeding only the rows and parameter shards its own 4 devices hold. The
result, gathered from both, equals a one-device update in the same process within 1e-5.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # two fresh processes and their compiles: about 30 s

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, os
from jaxrl_async.learner import mesh as parallel
assert parallel.initialize_distributed()
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from jaxrl_async.learner import update as L
from jaxrl_async.models import llama
from jaxrl_async.core.losses import LossConfig
from jaxrl_async.rollout.trajectory import Batch

B, T = 16, 16
cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim_=16, qk_norm=True, qkv_bias=True, max_len=T, logprob_chunk=8)
graphdef, params = llama.init_model(cfg, 0)
axes = llama.param_axes(params)
rng = np.random.default_rng(0)
tokens = rng.integers(1, cfg.vocab_size, (B, T)).astype(np.int32)
lengths = np.repeat([16, 11, 6, 3], 4)
mask = (np.arange(T)[None] < lengths[:, None]) & (np.arange(T)[None] > 0)
logp0 = np.asarray(llama.token_logprobs(graphdef, params, jnp.asarray(tokens)))
batch = Batch(tokens=tokens, loss_mask=mask, versions=np.where(mask, 0, -1).astype(np.int32),
              behav_logp=(logp0 + rng.normal(0, 0.3, (B, T))).astype(np.float32),
              prox_logp=(logp0 + rng.normal(0, 0.2, (B, T))).astype(np.float32),
              advantages=np.where(mask, rng.normal(0, 1, (B, 1)), 0).astype(np.float32))
host_params = jax.tree.map(np.asarray, params)
out = {"initial": [x.ravel().tolist() for x in jax.tree.leaves(host_params)],
       "devices": len(jax.devices()), "local": len(jax.local_devices()), "process": jax.process_index()}
for shape in (None, (2, 2, 2), (1, 8, 1)):
    opt = L.make_optimizer(1e-3, 1.0)
    if shape is None:  # the reference: this process alone, one device, no mesh
        mesh = sharding = None
        state = jax.device_put(L.create_train_state(host_params, opt, ewma=True), jax.local_devices()[0])
        sb = jax.device_put(batch, jax.local_devices()[0])
    else:
        mesh = parallel.make_mesh(data=shape[0], fsdp=shape[1], tensor=shape[2])
        state, sharding = parallel.sharded_train_state(host_params, opt, mesh, axes, ewma=True)
        sb = parallel.shard_rows(batch, mesh)
        # This process holds only its own devices' rows: half of them with data x fsdp over both processes.
        out[f"{shape}/local_rows"] = sum(s.data.shape[0] for s in sb.tokens.addressable_shards
                                         if s.replica_id == 0)
    update = L.make_rl_update(graphdef, opt, LossConfig(clip_high=0.28), num_minibatches=2, model=llama,
                              mesh=mesh, state_sharding=sharding)
    new, metrics = update(state, sb, jax.random.key(0), 0.9)
    leaves = jax.tree.leaves(new.params)
    if shape is not None:
        out[f"{shape}/devices"] = len(leaves[0].sharding.device_set)
        leaves = [multihost_utils.process_allgather(x, tiled=True) for x in leaves]
    out[str(shape)] = {"metrics": {k: float(v) for k, v in metrics.items()},
                       "params": [np.asarray(x).ravel().tolist() for x in leaves]}
print("RESULT" + json.dumps(out), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    coordinator = f"127.0.0.1:{_free_port()}"
    logs = tmp_path_factory.mktemp("multihost")
    procs = []
    try:
        for pid in range(2):
            env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                       JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
            out = open(logs / f"p{pid}.out", "w+")
            procs.append((subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, stdout=out,
                                           stderr=subprocess.STDOUT, text=True), out))
        results = []
        for p, out in procs:
            rc = p.wait(timeout=600)
            out.seek(0)
            text = out.read()
            assert rc == 0, text[-4000:]
            results.append(json.loads([x for x in text.splitlines() if x.startswith("RESULT")][0][len("RESULT"):]))
        return results
    finally:
        for p, out in procs:  # a failed or hung run leaves no process behind
            if p.poll() is None:
                p.kill()
                p.wait()
            out.close()


def test_two_processes_form_one_job_of_eight_devices(results):
    assert [r["process"] for r in results] == [0, 1]
    for r in results:
        assert r["devices"] == 8 and r["local"] == 4
        for shape in ("(2, 2, 2)", "(1, 8, 1)"):
            assert r[f"{shape}/devices"] == 8  # the params are split over both processes' devices
            assert r[f"{shape}/local_rows"] == 8  # each process fed half of the 16 rows


@pytest.mark.parametrize("shape", ["(2, 2, 2)", "(1, 8, 1)"])
def test_two_process_update_equals_one_device(results, shape):
    for r in results:
        one, many = r["None"], r[shape]
        assert one["metrics"]["loss/policy"] != 0.0
        for k, v in one["metrics"].items():
            assert many["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
        for a, b in zip(many["params"], one["params"]):  # as tests/test_sharding.py: within 1e-5
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        # The update moved the params: the equality is not of unchanged copies.
        assert max(np.abs(np.subtract(a, b)).max() for a, b in zip(one["params"], r["initial"])) > 1e-5
    # Both processes end with the same whole params.
    for a, b in zip(results[0][shape]["params"], results[1][shape]["params"]):
        np.testing.assert_array_equal(a, b)
