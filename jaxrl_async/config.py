"""The config schema: every field, its default and what it means.

Config files under `configs/` start from `base_config()` and change what they need; a
key that is not here is an error (`validate` names it), and so is a value outside the
allowed set. Validation runs at startup, before any compilation or process start. The
typed views at the end (`loss_config_from`, `model_config_from`, `numerics_from`,
`env_factory`) turn a validated config into what the components are built from.
"""

from __future__ import annotations

import functools
import math
import os

from flax import traverse_util
from ml_collections import config_dict

from jaxrl_async import envs
from jaxrl_async.core.losses import LossConfig
from jaxrl_async.core.proximal import Route
from jaxrl_async.models import families, llama
from jaxrl_async.models import transformer as model_lib


def base_config() -> config_dict.ConfigDict:
    """Every config field with its default and meaning; run configs start from this."""
    c = config_dict.ConfigDict()
    c.seed = 0  # one seed for model init, task seeds and sampling: same seed, same run

    c.task = config_dict.ConfigDict()
    # agent task, see jaxrl_async/envs: "search" | "search_easy" | "tooluse" | "tooluse_easy"; or "tau2":
    # τ2-bench through tau2's own code (jaxrl_async/tau2, docs/tau2.md; task.format="chat"; task.kwargs: domain,
    # split, user, ...)
    c.task.name = "tooluse_easy"
    c.task.kwargs = config_dict.ConfigDict()  # task difficulty knobs passed to make_env (see the task's constructor)
    # "tokens": the task in the word vocabulary (envs.TOKENIZER) | "chat": the task as a chat with tool calls
    # (envs.chat.ChatEnv; task.kwargs may also set its max_turn_tokens, system_prompt, format)
    c.task.format = "tokens"
    c.task.tokenizer = ""  # chat: HF tokenizer directory; "" = model.checkpoint's if set, else the shipped one

    c.model = config_dict.ConfigDict()
    c.model.d_model = 64  # transformer width
    c.model.n_layers = 2  # decoder blocks
    c.model.n_heads = 4  # attention heads (d_model must divide by it)
    c.model.d_ff = 256  # MLP hidden width
    c.model.max_len = 64  # context length: a whole multi-turn episode must fit (checked at startup)
    # "transformer": the library's own model (models/transformer.py) | "llama" | "qwen2" | "qwen3": the HF
    # families of models/llama.py (the sizes above are then hidden_size, num_layers, num_heads, intermediate_size)
    c.model.family = "transformer"
    # HF families: "" = random init from the sizes here; else an HF checkpoint directory (sizes from its config.json)
    c.model.checkpoint = ""
    c.model.num_kv_heads = 0  # HF families, random init: key/value heads (grouped-query attention); 0 = n_heads
    c.model.head_dim = 0  # HF families, random init: per-head width; 0 = d_model // n_heads
    c.model.tie_embeddings = False  # HF families, random init: the output head is the token embedding
    c.model.remat = False  # HF families: rematerialise each decoder layer in the learner (memory for compute)
    # HF families, with remat: what a layer keeps for the backward: "nothing_saveable" (least memory) |
    # "dots_saveable" | "dots_with_no_batch_dims_saveable" (keep matmul outputs: less recompute)
    c.model.remat_policy = "nothing_saveable"
    c.model.scan_layers = False  # HF families: stacked layer weights run by a scan (compile time flat in depth)

    c.numerics = config_dict.ConfigDict()
    c.numerics.dtype = "fp32"  # sampler (inference) numerics: "fp32" | "bf16" | "fp16" | "int8"
    c.numerics.logit_noise_std = 0.0  # Gaussian noise on sampler logits: a tunable training-inference mismatch

    c.sampler = config_dict.ConfigDict()
    c.sampler.temperature = 1.0  # sampling temperature of the behaviour policy
    c.sampler.chunk = 16  # decode steps between checks for new weights (partial rollouts)
    # KV-cache slots per generate call (the decode batch): 0 = one per episode; fewer than the call's episodes =
    # continuous batching (a slot whose episode ends takes the next one, so short episodes don't wait for long ones)
    c.sampler.slots = 0
    # Share the KV cache of the prompts' common prefix (a task's system prompt and tools): prefilled once
    # per parameter version and copied into each slot instead of prefilled per episode (rollout/sampler.py)
    c.sampler.prefix_cache = False
    # Threads stepping the envs: 0 = on the host between device calls (every slot waits); N > 0 = while an episode
    # waits on its env (a user simulator, a tool, the reward evaluation) the other slots keep decoding
    c.sampler.env_workers = 0
    # Devices one sampler decodes on, tensor-parallel (weights split over heads, MLP hidden and vocabulary, the KV
    # cache over heads); never FSDP. 1 = one device. Its own mesh, apart from the learner's (`parallel.*`).
    c.sampler.tensor = 1

    c.rl = config_dict.ConfigDict()
    c.rl.groups_per_step = 16  # task instances per RL step
    c.rl.group_size = 8  # samples per task instance (the group of group-relative advantages)
    c.rl.advantage = "grpo"  # "grpo" (group-normalised) | "rloo" (leave-one-out baseline)
    c.rl.normalize_std = True  # grpo only: divide by the group's reward std

    c.loss = config_dict.ConfigDict()  # jaxrl_async.core.losses.LossConfig, see docs/design.md section 2
    c.loss.clip_low = 0.2  # PPO clip below 1 (staleness term)
    c.loss.clip_high = 0.2  # PPO clip above 1 (asymmetric clipping when != clip_low)
    c.loss.dual_clip = config_dict.placeholder(float)  # dual-clip constant c > 1 for negative advantages; None = off
    c.loss.is_mode = "token"  # discrepancy weight: "none" | "token" | "sequence" | "geometric"
    c.loss.is_floor = 0.0  # lower truncation of the discrepancy weight
    c.loss.is_cap = 2.0  # upper truncation of the discrepancy weight
    c.loss.token_mask = config_dict.placeholder(tuple)  # (lo, hi) token rejection band on pi_old/mu; None = off
    c.loss.seq_mask_mode = "none"  # sequence rejection statistic: "none" | "sum" | "geometric"
    c.loss.seq_mask = (0.0, float("inf"))  # (lo, hi) band for the sequence statistic
    # drop a sequence if any token ratio is below this; None = off
    c.loss.catastrophic_thr = config_dict.placeholder(float)
    c.loss.aggregation = "token_mean"  # "token_mean" | "seq_mean_token_mean" | "seq_mean_token_sum_norm"
    c.loss.norm_length = config_dict.placeholder(int)  # normaliser for seq_mean_token_sum_norm
    # The staleness weight s = pi_prox / pi_old of the three-term form (only with proximal.anchor set):
    c.loss.staleness_is_mode = "token"  # "none" | "token" | "sequence" | "geometric", as is_mode
    c.loss.staleness_is_floor = 0.0  # lower truncation of the staleness weight
    c.loss.staleness_is_cap = 2.0  # upper truncation of the staleness weight
    # (lo, hi) token rejection band on pi_prox/pi_old; None = off
    c.loss.staleness_token_mask = config_dict.placeholder(tuple)

    # where prox_logp (pi_old or its stand-in) comes from, docs/design.md section 3
    c.proximal = config_dict.ConfigDict()
    # exact: "snapshot" (ring-buffer versions, recomputed by the learner) | "dedicated" (old-logit process beside
    # the sampler) | "interrupt" (sampler scores in-flight segments at each weight switch);
    # approximate: "recompute" (learner weights at step start) | "bypass" (behaviour log-probs) |
    # "loglinear" (interpolated from token versions) | "ewma" | "revised_ewma" (EWMA of learner weights)
    c.proximal.source = "recompute"
    c.proximal.on_evicted = "drop"  # snapshot: a token's version left the ring buffer: "drop" its episode or "fail"
    c.proximal.ewma_beta = 0.9  # ewma: decay per optimizer step, in [0, 1)
    c.proximal.beta_min = 0.0  # revised_ewma: lower bound of the staleness-matched decay
    c.proximal.beta_max = 0.95  # revised_ewma: upper bound of the staleness-matched decay (< 1)
    c.proximal.staleness_window = 8  # revised_ewma: recent batches whose mean token staleness sets the decay
    c.proximal.audit = True  # exact routes: also log the mask/truncation fractions `recompute` would have given
    # Three-term loss (docs/design.md section 2.6): with an exact source, prox_logp becomes this anchor and the
    # exact pi_old goes to the loss as old_logp: None/"" = off (two-term loss) | "recompute" | "ewma" | "revised_ewma"
    c.proximal.anchor = config_dict.placeholder(str)

    c.optim = config_dict.ConfigDict()
    c.optim.learning_rate = 3e-4  # AdamW learning rate of the RL phase
    c.optim.grad_clip = 1.0  # global-norm gradient clipping
    c.optim.weight_decay = 0.0  # AdamW weight decay
    c.optim.num_minibatches = 2  # gradient steps per epoch over one RL batch
    c.optim.num_epochs = 1  # passes over each RL batch

    c.learner = config_dict.ConfigDict()
    # Length buckets of the learner's batch: 0 = every batch padded to model.max_len; N > 0 = padded to the
    # shortest of N evenly spaced lengths (max_len/N, 2 max_len/N, ..., max_len) that holds its longest episode,
    # so batches of short episodes train on fewer columns and the update compiles at most N times
    # (rollout/trajectory.py `bucket_length`)
    c.learner.length_buckets = 0

    c.warmstart = config_dict.ConfigDict()
    c.warmstart.enabled = True  # supervised warm start on noisy scripted demonstrations before RL
    c.warmstart.episodes = 4096  # demonstration episodes
    c.warmstart.noise = 0.5  # probability that the scripted agent takes a plausible wrong action per turn
    c.warmstart.steps = 600  # supervised steps
    c.warmstart.batch_size = 64  # demonstrations per supervised step
    c.warmstart.learning_rate = 3e-3  # AdamW learning rate of the warm start
    c.warmstart.cache_dir = ""  # if set, warm-started params are cached here, keyed by task/model/warm-start/seed

    c.runtime = config_dict.ConfigDict()
    # "inline": sampler and learner in one process on a deterministic schedule; "process": sampler processes, async
    # queue; "ray": sampler actors on a Ray cluster
    c.runtime.mode = "inline"
    c.runtime.lag = 0  # inline: the sampler uses the weights of `lag` versions ago (0 = on-policy)
    c.runtime.partial_rollout = False  # inline: start each batch one version older and switch weights mid-episode
    c.runtime.switch_after = 32  # inline partial rollouts: decode steps before the mid-episode switch
    c.runtime.max_staleness = 2  # process: no token older than this many versions reaches the loss
    # process: sampler processes; 0 = none: groups arrive in WORKDIR/queue from external producers (the agent proxy,
    # `python -m jaxrl_async.serve --workdir=WORKDIR`)
    c.runtime.num_samplers = 1
    c.runtime.sampler_groups = 4  # process: groups (task instances x group_size) per sampler generate call
    # process: groups the queue holds; None = (max_staleness + 1) * groups_per_step
    c.runtime.queue_capacity = config_dict.placeholder(int)
    # process: fsync queued groups and the queue's renames, so the queue also survives a machine crash (a killed process
    # needs no fsync); False: skip them (tmpfs, throwaway runs)
    c.runtime.queue_fsync = True
    # versions K kept in the ring buffer; None = the fewest the runtime needs
    c.runtime.ring_capacity = config_dict.placeholder(int)
    # process: a sampler with no sign of progress this long while the learner waits is killed and restarted
    c.runtime.hang_timeout_s = 120.0
    # process: a new sampler may take this long (imports, compilation) before hang_timeout_s applies to it
    c.runtime.sampler_startup_s = 300.0
    # process: while the learner waits for groups, a status line (queue, samplers) this often
    c.runtime.wait_log_s = 30.0
    # ray: "" = start a local Ray cluster; else the address of a running one ("auto", "host:6379")
    c.runtime.ray_address = ""
    c.runtime.ray_num_cpus = 1.0  # ray: CPUs each sampler actor reserves
    c.runtime.ray_num_gpus = 0.0  # ray: GPUs each sampler actor reserves (fractions share a GPU)

    c.parallel = config_dict.ConfigDict()
    # The learner's device mesh (learner/mesh.py): axes data x fsdp x tensor, whose product is the devices used.
    c.parallel.num_devices = 0  # devices the learner uses (0 = all JAX sees, or data * fsdp * tensor when data is set)
    c.parallel.data = 0  # data parallelism: batch rows split, params whole (0 = the devices fsdp * tensor leave)
    c.parallel.fsdp = 1  # fully sharded data parallelism: rows split, and params/optimizer state split along the width
    c.parallel.tensor = 1  # tensor parallelism: params split along heads, MLP hidden and vocabulary; rows whole

    c.train = config_dict.ConfigDict()
    c.train.steps = 200  # RL steps (one batch, one parameter version each)
    c.train.log_every = 1  # steps between metrics.jsonl lines
    c.train.eval_every = 25  # steps between evaluations on held-out seeds
    c.train.checkpoint_every = 25  # steps between Orbax checkpoints of the full train state
    c.train.keep_checkpoints = 2  # checkpoints kept on disk
    # consecutive updates skipped for a non-finite loss or gradient before the run stops
    c.train.max_nonfinite_skips = 3

    c.eval = config_dict.ConfigDict()
    c.eval.episodes = 256  # held-out episodes per evaluation
    c.eval.temperature = 1.0  # evaluation samples the policy as trained (0 = greedy)
    c.eval.seed_offset = 1_000_000  # held-out task seeds start here; training seeds stay below it
    return c


# Allowed values of the string-valued fields (the loss's own modes are checked by LossConfig).
CHOICES = {
    "numerics.dtype": ("fp32", "bf16", "fp16", "int8"),
    "rl.advantage": ("grpo", "rloo"),
    "proximal.source": tuple(r.value for r in Route),
    "proximal.on_evicted": ("drop", "fail"),
    "proximal.anchor": (None, "", Route.RECOMPUTE.value, Route.EWMA.value, Route.REVISED_EWMA.value),
    "runtime.mode": ("inline", "process", "ray"),
    "model.family": tuple(families.FAMILIES),
    "task.format": ("tokens", "chat"),
}


def min_ring_capacity(config) -> int:
    """The fewest versions the ring buffer must keep: the oldest a batch may hold is `v - bound`."""
    rt = config.runtime
    if rt.mode == "inline":
        return rt.lag + (2 if rt.partial_rollout else 1)
    return rt.max_staleness + 1


_FREE_FORM = "task.kwargs"  # the task's constructor checks it when the env is built


def _flat(cfg) -> dict:
    """{'a.b': value} for every leaf of a (possibly nested) ConfigDict or dict; `task.kwargs` stays whole."""
    tree = cfg.to_dict() if isinstance(cfg, config_dict.ConfigDict) else dict(cfg)
    task = dict(tree.get("task", {}))
    has_kwargs = "kwargs" in task
    kwargs = task.pop("kwargs", None)
    flat = traverse_util.flatten_dict({**tree, "task": task}, sep=".")
    if has_kwargs:
        flat[_FREE_FORM] = kwargs
    return flat


def validate(config) -> None:
    """Raises ValueError naming the first bad field: unknown keys, wrong choices, bad ranges.

    `task.kwargs` is free-form (the task's constructor checks it when the env is built).
    """
    known, given = _flat(base_config()), _flat(config)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
    missing = sorted(set(known) - set(given))
    if missing:
        raise ValueError(f"config is missing field(s) {missing}; "
                         "start config files from jaxrl_async.config.base_config()")
    for field, allowed in CHOICES.items():
        if given[field] not in allowed:
            raise ValueError(f"config.{field} must be one of {allowed}; got {given[field]!r}")
    # bool is a subclass of int, so `True` would pass every numeric check below as 1.
    for field, default in known.items():
        if isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(given[field], bool):
            raise ValueError(f"config.{field} must be a number, not a boolean; got {given[field]!r}")

    def positive(field, integer=True):
        v = given[field]
        if isinstance(v, bool) or (integer and not isinstance(v, int)) or v is None or v <= 0:
            raise ValueError(f"config.{field} must be a positive {'integer' if integer else 'number'}; got {v!r}")

    for f in ("model.d_model", "model.n_layers", "model.n_heads", "model.d_ff", "model.max_len",
              "rl.groups_per_step", "rl.group_size", "optim.num_minibatches", "optim.num_epochs",
              "train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
              "train.keep_checkpoints", "train.max_nonfinite_skips", "eval.episodes", "sampler.chunk",
              "warmstart.episodes", "warmstart.steps", "warmstart.batch_size", "runtime.switch_after",
              "runtime.sampler_groups"):
        positive(f)
    for f in ("optim.learning_rate", "optim.grad_clip", "warmstart.learning_rate", "runtime.hang_timeout_s",
              "runtime.sampler_startup_s", "runtime.wait_log_s"):
        positive(f, integer=False)
    slots = given["sampler.slots"]
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 0:
        raise ValueError(f"config.sampler.slots must be an integer >= 0 (0 = one KV-cache slot per episode); "
                         f"got {given['sampler.slots']!r}")
    if given["rl.advantage"] == "rloo" and given["rl.group_size"] < 2:
        raise ValueError("config.rl.group_size must be >= 2 with rl.advantage='rloo' (leave-one-out needs a peer)")
    batch = given["rl.groups_per_step"] * given["rl.group_size"]
    if batch % given["optim.num_minibatches"]:
        raise ValueError(f"config.optim.num_minibatches ({given['optim.num_minibatches']}) must divide the RL batch "
                         f"rl.groups_per_step * rl.group_size = {batch}")
    for f, least in (("parallel.num_devices", 0), ("parallel.data", 0), ("parallel.fsdp", 1), ("parallel.tensor", 1)):
        v = given[f]
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"config.{f} must be an integer >= {least}{' (0 = derived)' if least == 0 else ''}; "
                             f"got {v!r}")
    p = {k: given[f"parallel.{k}"] for k in ("num_devices", "data", "fsdp", "tensor")}
    if p["data"] and p["num_devices"] and p["data"] * p["fsdp"] * p["tensor"] != p["num_devices"]:
        raise ValueError(f"config.parallel.data * fsdp * tensor = {p['data']} * {p['fsdp']} * {p['tensor']} = "
                         f"{p['data'] * p['fsdp'] * p['tensor']}, but config.parallel.num_devices = "
                         f"{p['num_devices']}: their product is the number of devices used")
    if not p["data"] and p["num_devices"] % (p["fsdp"] * p["tensor"]):
        raise ValueError(f"config.parallel.fsdp * tensor = {p['fsdp']} * {p['tensor']} does not divide "
                         f"config.parallel.num_devices = {p['num_devices']}")
    if not (isinstance(given["runtime.lag"], int) and given["runtime.lag"] >= 0):
        raise ValueError(f"config.runtime.lag must be an integer >= 0; got {given['runtime.lag']!r}")
    if not (isinstance(given["runtime.max_staleness"], int) and given["runtime.max_staleness"] >= 0):
        raise ValueError("config.runtime.max_staleness must be an integer >= 0; "
                         f"got {given['runtime.max_staleness']!r}")
    n = given["runtime.num_samplers"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"config.runtime.num_samplers must be an integer >= 0 (0: external producers, process "
                         f"runtime only); got {n!r}")
    if n == 0 and given["runtime.mode"] != "process":
        raise ValueError(f"config.runtime.num_samplers = 0 (no sampler processes: groups from external producers "
                         f"such as the agent proxy) needs config.runtime.mode = 'process'; got "
                         f"{given['runtime.mode']!r}")
    if given["runtime.mode"] in ("process", "ray"):
        if given["runtime.sampler_groups"] > given["rl.groups_per_step"]:
            raise ValueError(f"config.runtime.sampler_groups ({given['runtime.sampler_groups']}) must be <= "
                             f"config.rl.groups_per_step ({given['rl.groups_per_step']}), "
                             "or the staleness gate never opens")
        cap = given["runtime.queue_capacity"]
        if cap is not None and cap < given["rl.groups_per_step"]:
            raise ValueError(f"config.runtime.queue_capacity ({cap}) must hold at least one batch "
                             f"(config.rl.groups_per_step = {given['rl.groups_per_step']})")
    if isinstance(given["sampler.tensor"], bool) or not isinstance(given["sampler.tensor"], int) or \
            given["sampler.tensor"] < 1:
        raise ValueError(f"config.sampler.tensor must be an integer >= 1 (the devices one sampler decodes on); "
                         f"got {given['sampler.tensor']!r}")
    if isinstance(given["sampler.env_workers"], bool) or not isinstance(given["sampler.env_workers"], int) or \
            given["sampler.env_workers"] < 0:
        raise ValueError(f"config.sampler.env_workers must be an integer >= 0 (0 = env steps on the host); "
                         f"got {given['sampler.env_workers']!r}")
    nb = given["learner.length_buckets"]
    if isinstance(nb, bool) or not isinstance(nb, int) or not 0 <= nb <= given["model.max_len"]:
        raise ValueError(f"config.learner.length_buckets must be an integer in [0, model.max_len] (0 = no buckets: "
                         f"every batch padded to model.max_len); got {nb!r}")
    if not isinstance(given["sampler.prefix_cache"], bool):
        raise ValueError(f"config.sampler.prefix_cache must be True or False; got {given['sampler.prefix_cache']!r}")
    if not isinstance(given["runtime.queue_fsync"], bool):
        raise ValueError(f"config.runtime.queue_fsync must be True or False; got {given['runtime.queue_fsync']!r}")
    for f in ("runtime.ray_num_cpus", "runtime.ray_num_gpus"):
        v = given[f]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"config.{f} must be a finite number >= 0; got {v!r}")
    if not isinstance(given["runtime.ray_address"], str):
        raise ValueError(f"config.runtime.ray_address must be a string (\"\" = a local cluster); "
                         f"got {given['runtime.ray_address']!r}")
    ring = given["runtime.ring_capacity"]
    if ring is not None:
        need = min_ring_capacity(config)
        why = ("runtime.lag + 1 (+1 with partial_rollout)" if given["runtime.mode"] == "inline"
               else "runtime.max_staleness + 1")
        if ring < need:
            raise ValueError(f"config.runtime.ring_capacity ({ring}) must be at least {why} = {need}: "
                             f"older versions would be evicted while tokens of them are still in use")
    if given["proximal.anchor"] and not Route(given["proximal.source"]).exact:
        raise ValueError(f"config.proximal.anchor ({given['proximal.anchor']!r}) needs an exact proximal.source "
                         f"({', '.join(r.value for r in Route if r.exact)}), which supplies pi_old; "
                         f"got proximal.source={given['proximal.source']!r} (unset proximal.anchor for the "
                         f"two-term loss)")
    if not 0.0 <= given["proximal.ewma_beta"] < 1.0:
        raise ValueError(f"config.proximal.ewma_beta must be in [0, 1); got {given['proximal.ewma_beta']!r}")
    if not 0.0 <= given["proximal.beta_min"] <= given["proximal.beta_max"] < 1.0:
        raise ValueError(f"config.proximal.beta_min and beta_max must satisfy 0 <= beta_min <= beta_max < 1; "
                         f"got {given['proximal.beta_min']!r}, {given['proximal.beta_max']!r}")
    if not (isinstance(given["proximal.staleness_window"], int) and given["proximal.staleness_window"] >= 1):
        raise ValueError(f"config.proximal.staleness_window must be an integer >= 1; "
                         f"got {given['proximal.staleness_window']!r}")
    if given["sampler.temperature"] <= 0:
        raise ValueError(f"config.sampler.temperature must be > 0 (the behaviour policy must be stochastic); "
                         f"got {given['sampler.temperature']!r}")
    if given["eval.temperature"] < 0:
        raise ValueError(f"config.eval.temperature must be >= 0 (0 = greedy); got {given['eval.temperature']!r}")
    if not 0.0 <= given["warmstart.noise"] <= 1.0:
        raise ValueError(f"config.warmstart.noise must be in [0, 1]; got {given['warmstart.noise']!r}")
    if not (given["numerics.logit_noise_std"] >= 0 and math.isfinite(given["numerics.logit_noise_std"])):
        raise ValueError(f"config.numerics.logit_noise_std must be a finite number >= 0; "
                         f"got {given['numerics.logit_noise_std']!r}")
    _validate_model_family(given)
    if given["task.name"] == "tau2":
        _validate_tau2(given["task.format"], given[_FREE_FORM] or {})


def _validate_model_family(given: dict) -> None:
    """The `model.family` / `model.checkpoint` / `task.format` fields (no file access: see `model_config_from`)."""
    family, ckpt = given["model.family"], given["model.checkpoint"]
    if ckpt is None:
        raise ValueError("config.model.checkpoint must be set to a Hugging Face checkpoint directory "
                         "(--config.model.checkpoint=/path/to/checkpoint); "
                         "this config does not train from random weights")
    if not isinstance(ckpt, str):
        raise ValueError(f"config.model.checkpoint must be a directory path (\"\" = random init); got {ckpt!r}")
    if not isinstance(given["task.tokenizer"], str):
        raise ValueError("config.task.tokenizer must be a directory path (\"\" = default); "
                         f"got {given['task.tokenizer']!r}")
    if not isinstance(given["model.scan_layers"], bool):
        raise ValueError(f"config.model.scan_layers must be a boolean; got {given['model.scan_layers']!r}")
    if given["model.remat_policy"] not in llama.REMAT_POLICIES:
        raise ValueError(f"config.model.remat_policy must be one of {sorted(llama.REMAT_POLICIES)}; "
                         f"got {given['model.remat_policy']!r}")
    if not isinstance(given["model.remat"], bool) or not isinstance(given["model.tie_embeddings"], bool):
        raise ValueError(f"config.model.remat and config.model.tie_embeddings must be booleans; "
                         f"got {given['model.remat']!r}, {given['model.tie_embeddings']!r}")
    for f in ("model.num_kv_heads", "model.head_dim"):
        v = given[f]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"config.{f} must be an integer >= 0 (0 = derived); got {v!r}")
    if not families.family(family).is_hf:
        hf_families = " or ".join(repr(f) for f in families.HF_FAMILIES)
        if given["model.scan_layers"]:
            raise ValueError(f"config.model.scan_layers needs an HF model.family ({hf_families}); "
                             f"got model.family={family!r}")
        if ckpt:
            raise ValueError(f"config.model.checkpoint ({ckpt!r}) needs an HF model.family "
                             f"({hf_families}); got model.family={family!r}")
        if given["model.d_model"] % given["model.n_heads"]:
            raise ValueError(f"config.model.d_model ({given['model.d_model']}) must be divisible by "
                             f"config.model.n_heads ({given['model.n_heads']})")
    else:
        if ckpt and given["task.format"] != "chat":
            raise ValueError("config.model.checkpoint needs task.format='chat' (a pretrained model reads its "
                             "own tokenizer's ids, not the word vocabulary)")
        if not ckpt:
            heads, hd = given["model.n_heads"], given["model.head_dim"]
            kv = given["model.num_kv_heads"] or heads
            if heads % kv:
                raise ValueError(f"config.model.n_heads ({heads}) must be a multiple of "
                                 f"config.model.num_kv_heads ({kv})")
            if hd == 0 and given["model.d_model"] % heads:
                raise ValueError(f"config.model.d_model ({given['model.d_model']}) must be divisible by "
                                 f"config.model.n_heads ({heads}) when config.model.head_dim is 0")
            if (hd or given["model.d_model"] // heads) % 2:
                width = hd or given["model.d_model"] // heads
                raise ValueError(f"config.model.head_dim ({width}) must be even (rotary)")
    if given["task.tokenizer"] and given["task.format"] != "chat":
        raise ValueError(f"config.task.tokenizer ({given['task.tokenizer']!r}) is used with task.format='chat' only")


def _validate_tau2(task_format: str, kwargs: dict) -> None:
    """task.name='tau2': the format and the task.kwargs that can be checked without tau2 (the
    split and the rest are checked when the env is built, at startup)."""
    from jaxrl_async.tau2.tasks import DOMAINS
    from jaxrl_async.tau2.users import USERS

    if task_format != "chat":
        raise ValueError(f"config.task.format must be 'chat' with task.name='tau2'; got {task_format!r}")
    if "domain" not in kwargs:
        raise ValueError(f"config.task.kwargs.domain must be set with task.name='tau2' (one of {DOMAINS})")
    if kwargs["domain"] not in DOMAINS:
        raise ValueError(f"config.task.kwargs.domain must be one of {DOMAINS}; got {kwargs['domain']!r}")
    if not isinstance(kwargs.get("split", "base"), str):
        raise ValueError(f"config.task.kwargs.split must be a split name (base, train, test); got {kwargs['split']!r}")
    if kwargs.get("user", "scripted") not in USERS:
        raise ValueError(f"config.task.kwargs.user must be one of {USERS}; got {kwargs['user']!r}")


# Typed views of a validated config: what the components are built from.


def loss_config_from(config) -> LossConfig:
    """The LossConfig of `config.loss` (which validates the loss fields)."""
    fields = config.loss.to_dict()
    for band in ("token_mask", "seq_mask", "staleness_token_mask"):
        if fields[band] is not None:
            fields[band] = tuple(float(x) for x in fields[band])
    return LossConfig(**fields)


def proximal_anchor(config) -> Route | None:
    """The PPO anchor of the three-term loss (`proximal.anchor`), or None for the two-term loss."""
    anchor = config.proximal.get("anchor")
    return Route(anchor) if anchor else None


_TRANSFORMER_FIELDS = ("d_model", "n_layers", "n_heads", "d_ff", "max_len")


def model_module(config):
    """The model module of a run config (by `model.family`) or of a model config (by its type), from
    the family table (`models.families`): `models.transformer` or `models.llama`, both with the
    functions of `families.FUNCTIONS`, which the sampler, learner, proximal route and scorer call."""
    if isinstance(config, (llama.LlamaConfig, model_lib.ModelConfig)):
        return families.of_model_config(config).module
    return families.family(config.model.family).module


def checkpoint_dir(config) -> str:
    """`model.checkpoint`, checked to be an HF checkpoint directory (raises ValueError naming the field)."""
    path = config.model.checkpoint
    if not path or not os.path.isdir(path):
        raise ValueError(f"config.model.checkpoint ({path!r}) is not a directory: set it to a Hugging Face "
                         f"checkpoint directory (config.json + *.safetensors), --config.model.checkpoint=/path")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"config.model.checkpoint ({path!r}) has no config.json: not a Hugging Face checkpoint")
    return path


def tokenizer_dir(config) -> tuple[str, str]:
    """(directory, the field it comes from) of the chat tokenizer: `task.tokenizer`, else the
    checkpoint's (`model.checkpoint`), else the shipped one."""
    if config.task.tokenizer:
        return config.task.tokenizer, "task.tokenizer"
    if config.model.checkpoint:
        return config.model.checkpoint, "model.checkpoint"
    from jaxrl_async.envs.chat_tokenizer import SHIPPED_TOKENIZER
    return SHIPPED_TOKENIZER, "task.tokenizer"


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str):
    from jaxrl_async.models import hf
    return hf.load_tokenizer(path)


def chat_tokenizer(config):
    """The chat task's tokenizer (an `hf.HFTokenizer`, loaded once per directory)."""
    path, field = tokenizer_dir(config)
    try:
        return _load_tokenizer(os.path.abspath(path))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"config.{field} ({path!r}): cannot load a tokenizer from it: {e}") from None


def vocab_size(config) -> int:
    """The task's vocabulary: the word tokenizer's (task.format='tokens') or the chat tokenizer's."""
    if config.task.format == "chat":
        return int(chat_tokenizer(config).vocab_size)
    return envs.TOKENIZER.vocab_size


def model_config_from(config):
    """The model of `config.model`: a `transformer.ModelConfig` over the task's vocabulary, or a
    `llama.LlamaConfig` (HF families: from the sizes here, or from `model.checkpoint`'s config.json)."""
    m = config.model
    fam = families.family(m.family)
    if not fam.is_hf:
        return model_lib.ModelConfig(vocab_size=vocab_size(config), **{k: m[k] for k in _TRANSFORMER_FIELDS})
    arch = fam.hf_architecture
    if m.checkpoint:
        from jaxrl_async.models import hf
        path = os.path.join(checkpoint_dir(config), "config.json")
        try:
            model_config = hf.config_from_hf(hf._read_json(path), max_len=m.max_len, source=path, remat=m.remat,
                                             remat_policy=m.remat_policy, scan_layers=m.scan_layers)
        except ValueError as e:
            raise ValueError(f"config.model.checkpoint: {e}") from None
        if model_config.architecture != arch:
            raise ValueError(f"config.model.family={m.family!r} expects {arch}, but config.model.checkpoint "
                             f"({m.checkpoint!r}) is a {model_config.architecture}")
        return model_config
    return llama.LlamaConfig(
        vocab_size=vocab_size(config), hidden_size=m.d_model, intermediate_size=m.d_ff, num_layers=m.n_layers,
        num_heads=m.n_heads, num_kv_heads=m.num_kv_heads or m.n_heads, head_dim_=m.head_dim or None,
        tie_word_embeddings=m.tie_embeddings, qkv_bias=fam.qkv_bias, qk_norm=fam.qk_norm,
        max_len=m.max_len, remat=m.remat, remat_policy=m.remat_policy, scan_layers=m.scan_layers, architecture=arch)


def init_params(config, model_config=None):
    """(graphdef, float32 params) of the run's model: random from `seed`, or `model.checkpoint`'s weights."""
    model_config = model_config or model_config_from(config)
    if config.model.checkpoint:
        from jaxrl_async.models import hf
        loaded = hf.load(checkpoint_dir(config), dtype="float32", max_len=model_config.max_len,
                         remat=model_config.remat, remat_policy=model_config.remat_policy,
                         scan_layers=model_config.scan_layers)
        if loaded.config != model_config:
            raise ValueError(f"config.model.checkpoint: loaded {loaded.config} differs from {model_config}")
        return loaded.graphdef, loaded.params
    return model_module(model_config).init_model(model_config, config.seed)


def model_structure(config, model_config=None):
    """(graphdef, params) with the run's model structure and random values, without reading
    checkpoint weights: what a sampler or scorer needs before its first version arrives."""
    model_config = model_config or model_config_from(config)
    return model_module(model_config).init_model(model_config, config.seed)


def numerics_from(config) -> model_lib.Numerics:
    """The sampler's inference numerics (`config.numerics`)."""
    return model_lib.Numerics(**config.numerics.to_dict())


def env_factory(config):
    """A zero-argument constructor of the configured task's env."""
    kwargs = config.task.kwargs.to_dict()
    if config.task.name == "tau2":
        from jaxrl_async.tau2.env import Tau2Env
        tokenizer = chat_tokenizer(config)
        kwargs.setdefault("max_context", config.model.max_len)  # episodes end at the model's context
        return lambda: Tau2Env(tokenizer, **kwargs)
    if config.task.format == "chat":
        from jaxrl_async.envs.chat import make_chat_env
        tokenizer = chat_tokenizer(config)
        return lambda: make_chat_env(config.task.name, tokenizer, **kwargs)
    return lambda: envs.make_env(config.task.name, **kwargs)
