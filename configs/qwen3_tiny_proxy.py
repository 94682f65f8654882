"""configs/qwen3_tiny.py trained through the agent proxy: a process-mode run with no sampler processes.

The learner takes its groups from `WORKDIR/queue`, where the agent proxy
(`python -m jaxrl_async.serve --config=configs/qwen3_tiny_proxy.py --workdir=WORKDIR`) puts the
episodes an OpenAI-API program plays (`examples/openai_agent.py`); docs/serve.md has the commands.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("qwen3_tiny", os.path.join(os.path.dirname(__file__), "qwen3_tiny.py"))
qwen3_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qwen3_tiny)


def get_config():
    c = qwen3_tiny.get_config()
    c.runtime.mode = "process"
    c.runtime.num_samplers = 0  # the groups come from the agent proxy
    c.runtime.wait_log_s = 60.0
    return c
