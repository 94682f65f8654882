"""The agent proxy feeding a process-mode run with no sampler processes (`runtime.num_samplers = 0`).

One tiny run (`cluster.RLCluster`, process runtime, no samplers) and the server beside it
(`build_service(config, workdir=...)`, uvicorn in a thread), built once for the module: the
proxy's groups go into the run's queue under `GroupKey`s and the learner trains on them.
"""

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from jaxrl_async import config as config_lib  # noqa: E402
from jaxrl_async.config import base_config  # noqa: E402
from jaxrl_async.runtime.groups import GroupKey  # noqa: E402


def _config():
    c = base_config()
    c.task.name, c.task.format = "search_easy", "chat"
    c.task.kwargs.system_prompt = "Call one tool per turn."
    c.task.kwargs.max_turn_tokens = 24
    c.model.family = "qwen3"
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.num_kv_heads = 32, 1, 2, 1
    c.model.head_dim, c.model.d_ff, c.model.max_len = 16, 64, 512
    c.rl.groups_per_step, c.rl.group_size = 1, 2
    c.runtime.mode, c.runtime.num_samplers, c.runtime.sampler_groups = "process", 0, 1
    c.runtime.queue_fsync = False
    c.warmstart.enabled = False
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 1, 1, 1
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from jaxrl_async.cluster import RLCluster
    from jaxrl_async.serve.app import start_in_thread
    from jaxrl_async.serve.service import build_service

    workdir = str(tmp_path_factory.mktemp("proxy_run"))
    config = _config()
    cluster = RLCluster(config, workdir, resume=False, log=lambda *a: None)
    service = build_service(config, workdir=workdir, model_name="tiny", max_slots=2)
    server, url = start_in_thread(service)
    yield cluster, service, url
    server.should_exit = True
    server.thread.join(timeout=10)
    service.engine.close()
    cluster.close()


@pytest.mark.slow  # compiles the learner's update: ~40 s on 2 CPU cores
def test_learner_without_samplers_trains_on_the_proxys_groups(run):
    from jaxrl_async.envs.chat import make_chat_env

    cluster, service, url = run
    cluster.runtime.start(int(cluster.state.version))
    calls = {}
    for i in range(2):  # one group of rl.group_size = 2 episodes, one call each
        env = make_chat_env("search_easy", system_prompt="Call one tool per turn.", max_turn_tokens=24)
        env.reset(0)
        client = openai.OpenAI(base_url=f"{url}/episodes/ep{i}", api_key="dummy_key", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="tiny", messages=list(env.messages), tools=env.tools, seed=i,
                                           max_tokens=8, extra_body={"return_token_ids": True})
        calls[i] = (r.model_extra["prompt_token_ids"], r.choices[0].model_extra["token_ids"],
                    r.choices[0].finish_reason != "length", r.model_extra["policy_version"])
        reply = httpx.post(f"{url}/episodes/ep{i}/reward", json={"reward": float(i), "group": "task0"}, timeout=60)
        assert reply.status_code == 200
    assert cluster.runtime.queue.depth() == 1
    (key,) = cluster.runtime.queue.waiting_keys()
    assert GroupKey.parse(key) == GroupKey(cluster.meta["epoch"], 0, 0, 0)

    seen = []
    take = cluster.runtime.next_groups
    cluster.runtime.next_groups = lambda step, v: seen.append(take(step, v)) or seen[-1]
    metrics = cluster.train_step(0)
    trajs, info = seen[0]
    assert info["queue/taken_total"] == 1.0 and info["queue/dropped_stale"] == 0.0
    assert np.isfinite(metrics["loss/policy"]) and int(cluster.state.version) == 1
    assert metrics["rollout/tokens_per_s"] > 0 and metrics["perf/sampler_gate_wait_s"] == 0.0  # train.py reads them
    for t, i in zip(sorted(trajs, key=lambda t: t.reward), range(2)):
        prompt, ids, ended, version = calls[i]
        # Token in, token out: the trajectory is the call's prompt and generated ids, nothing re-tokenised.
        assert t.tokens.tolist() == prompt + ids + ([] if ended else [service.chat.eot_id])
        assert np.flatnonzero(t.loss_mask).tolist() == list(range(len(prompt), len(prompt) + len(ids)))
        assert (t.versions[t.loss_mask] == version).all() and version == 0
    # The server follows the learner's new version (once the ring buffer's background write is on disk).
    cluster.store.flush()
    client = openai.OpenAI(base_url=f"{url}/episodes/ep9", api_key="dummy_key", max_retries=0, timeout=120)
    env = make_chat_env("search_easy", system_prompt="Call one tool per turn.", max_turn_tokens=24)
    env.reset(1)
    r = client.chat.completions.create(model="tiny", messages=list(env.messages), tools=env.tools, max_tokens=4)
    assert r.model_extra["policy_version"] == 1


@pytest.mark.parametrize("overrides, field", [
    ({"runtime.num_samplers": -1}, "runtime.num_samplers"),
    ({"runtime.num_samplers": 0, "runtime.mode": "ray"}, "runtime.num_samplers"),
    ({"runtime.num_samplers": 0, "runtime.mode": "inline"}, "runtime.mode"),
])
def test_bad_config_names_the_field(overrides, field):
    c = _config()
    for k, v in overrides.items():
        section, name = k.split(".")
        c[section][name] = v
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        config_lib.validate(c)


def test_proxy_needs_a_run_without_samplers(tmp_path):
    from jaxrl_async.runtime.producer import QueueProducer

    c = _config()
    c.runtime.num_samplers = 1
    with pytest.raises(ValueError, match="num_samplers = 0"):
        QueueProducer(str(tmp_path), c)
    c.runtime.num_samplers = 0
    with pytest.raises(ValueError, match="epoch is missing"):
        QueueProducer(str(tmp_path), c)
