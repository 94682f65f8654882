"""jaxrl_async: asynchronous RL for language-model agents with decomposed off-policy correction.

Sub-packages, lowest first (each imports only from the ones listed before it):

- `core`: the math: the decomposed-ratio policy loss, advantages, the proximal routes' pure pieces.
- `models`: the model families (learner forward, KV-cache decoding, inference numerics): the
  library's transformer and the Llama-3 / Qwen2.5 / Qwen3 family, with Hugging Face
  checkpoints and tokenizers read and written (`models.hf`).
- `envs`: the agent tasks, their word tokenizer, and their chat form with tool calls (`envs.chat`).
- `rollout`: trajectories and the typed batch, the sampler, evaluation.
- `learner`: train state and jitted updates, the proximal route, the device mesh, checkpoints, warm start.
- `runtime`: the version ring buffer, the shared-memory weight hand-off, the spool queue, sampler
  and old-log-prob scorer processes; the inline, process and Ray runtimes.
- `cluster`: `RLCluster`, every component of a run built from a config in one call.
- `train`: the entry point; `experiments`: sweeps and reports.

Two top-level modules sit beside the list: `config` (the schema and its typed views; it
imports `core`, `models` and `envs`, and is imported from `rollout` up) and `metrics_log`
(metrics files and figures; imports nothing of the package). `tau2` (τ2-bench through tau2's
own code, docs/tau2.md) is a task package beside the list: its env builds on `envs` and `models`,
its `evaluate` on `rollout` and `runtime`; `config` imports it only to build a `task.name="tau2"` env.

See docs/design.md for the design.
"""

__version__ = "0.1.0"
