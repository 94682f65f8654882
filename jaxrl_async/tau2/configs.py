"""The paper's τ2-bench setting for real checkpoints (``configs/tau2_{retail,airline,telecom}_qwen3.py``).

A Qwen3 checkpoint trained on the domain's ``train`` split with tau2's user simulator behind an
OpenAI-compatible endpoint, evaluated on the ``test`` split (avg@4 for retail and airline, avg@2
for telecom) with ``python -m jaxrl_async.tau2 evaluate``. The checkpoint and the user endpoint
have no default: without ``--config.model.checkpoint`` the run stops at startup naming
``model.checkpoint``, without ``--config.task.kwargs.user_model`` / ``user_api_base`` it stops naming
those fields. The sizes are a starting point for one 80 GB GPU, not tuned results.
"""

from __future__ import annotations

from ml_collections import config_dict

from jaxrl_async.config import base_config

# The metric the paper reports per domain: trials K of avg@K on the test split.
EVAL_TRIALS = {"retail": 4, "airline": 4, "telecom": 2}


def paper_config(domain: str) -> config_dict.ConfigDict:
    c = base_config()
    c.task.name = "tau2"
    c.task.format = "chat"
    c.task.tokenizer = ""  # the checkpoint's own tokenizer and chat template
    c.task.kwargs.domain = domain
    c.task.kwargs.split = "train"
    c.task.kwargs.user = "openai"
    c.task.kwargs.user_model = ""  # required, e.g. "openai/Qwen3-32B" (litellm's OpenAI-compatible route)
    c.task.kwargs.user_api_base = ""  # required, e.g. "http://localhost:8000/v1"
    c.task.kwargs.user_timeout_s = 120.0
    c.task.kwargs.user_retries = 2
    c.task.kwargs.user_deadline_s = 1800.0
    c.task.kwargs.max_turns = 30
    c.task.kwargs.max_turn_tokens = 1024  # room for Qwen3's thinking before a call

    c.model.family = "qwen3"
    c.model.checkpoint = config_dict.placeholder(str)  # required: --config.model.checkpoint=/path
    # The system prompt with the policy and tools is ~3-6k tokens; long episodes end at the context.
    c.model.max_len = 16384
    # Batches padded to the shortest multiple of 2048 tokens that holds their longest episode (8 shapes at most).
    c.learner.length_buckets = 8
    c.model.remat = True
    c.numerics.dtype = "bf16"

    c.rl.groups_per_step = 8
    c.rl.group_size = 8
    c.optim.learning_rate = 1e-6
    c.optim.num_minibatches = 8
    c.warmstart.enabled = False  # the checkpoint already calls tools in its own format
    c.sampler.slots = 32  # continuous batching: long episodes do not hold the others
    # A slot waiting on the user simulator (a network call) or the evaluator leaves the decode batch; the
    # evaluator (0.6-2 s of Python a retail or airline episode) runs in worker processes, off the GIL.
    c.sampler.env_workers = 32
    c.task.kwargs.eval_processes = 4

    c.train.steps = 200
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    c.eval.episodes = 64
    return c
