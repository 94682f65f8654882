"""The config schema: every field, its default and what it means.

Config files under `configs/` start from `base_config()` and change what they need; a
key that is not here is an error (`validate` names it), and so is a value outside the
allowed set. Validation runs at startup, before any compilation or process start. The
typed views at the end (`loss_config_from`, `model_config_from`, `numerics_from`,
`env_factory`) turn a validated config into what the components are built from.
"""

from __future__ import annotations

import math

from flax import traverse_util
from ml_collections import config_dict

from jaxrl_async import envs
from jaxrl_async.core.losses import LossConfig
from jaxrl_async.core.proximal import Route
from jaxrl_async.models import transformer as model_lib


def base_config() -> config_dict.ConfigDict:
    """Every config field with its default and meaning; run configs start from this."""
    c = config_dict.ConfigDict()
    c.seed = 0  # one seed for model init, task seeds and sampling: same seed, same run

    c.task = config_dict.ConfigDict()
    c.task.name = "tooluse_easy"  # agent task, see jaxrl_async/envs: "search" | "search_easy" | "tooluse" | "tooluse_easy"
    c.task.kwargs = config_dict.ConfigDict()  # task difficulty knobs passed to make_env (see the task's constructor)

    c.model = config_dict.ConfigDict()
    c.model.d_model = 64  # transformer width
    c.model.n_layers = 2  # decoder blocks
    c.model.n_heads = 4  # attention heads (d_model must divide by it)
    c.model.d_ff = 256  # MLP hidden width
    c.model.max_len = 64  # context length: a whole multi-turn episode must fit (checked at startup)

    c.numerics = config_dict.ConfigDict()
    c.numerics.dtype = "fp32"  # sampler (inference) numerics: "fp32" | "bf16" | "fp16" | "int8"
    c.numerics.logit_noise_std = 0.0  # Gaussian noise on sampler logits: a tunable training-inference mismatch

    c.sampler = config_dict.ConfigDict()
    c.sampler.temperature = 1.0  # sampling temperature of the behaviour policy
    c.sampler.chunk = 16  # decode steps between checks for new weights (partial rollouts)

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
    c.loss.catastrophic_thr = config_dict.placeholder(float)  # drop a sequence if any token ratio is below this; None = off
    c.loss.aggregation = "token_mean"  # "token_mean" | "seq_mean_token_mean" | "seq_mean_token_sum_norm"
    c.loss.norm_length = config_dict.placeholder(int)  # normaliser for seq_mean_token_sum_norm
    # The staleness weight s = pi_prox / pi_old of the three-term form (only with proximal.anchor set):
    c.loss.staleness_is_mode = "token"  # "none" | "token" | "sequence" | "geometric", as is_mode
    c.loss.staleness_is_floor = 0.0  # lower truncation of the staleness weight
    c.loss.staleness_is_cap = 2.0  # upper truncation of the staleness weight
    c.loss.staleness_token_mask = config_dict.placeholder(tuple)  # (lo, hi) token rejection band on pi_prox/pi_old; None = off

    c.proximal = config_dict.ConfigDict()  # where prox_logp (pi_old or its stand-in) comes from, docs/design.md section 3
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

    c.warmstart = config_dict.ConfigDict()
    c.warmstart.enabled = True  # supervised warm start on noisy scripted demonstrations before RL
    c.warmstart.episodes = 4096  # demonstration episodes
    c.warmstart.noise = 0.5  # probability that the scripted agent takes a plausible wrong action per turn
    c.warmstart.steps = 600  # supervised steps
    c.warmstart.batch_size = 64  # demonstrations per supervised step
    c.warmstart.learning_rate = 3e-3  # AdamW learning rate of the warm start
    c.warmstart.cache_dir = ""  # if set, warm-started params are cached here, keyed by task/model/warm-start/seed

    c.runtime = config_dict.ConfigDict()
    c.runtime.mode = "inline"  # "inline": sampler and learner in one process on a deterministic schedule; "process": sampler processes, async queue
    c.runtime.lag = 0  # inline: the sampler uses the weights of `lag` versions ago (0 = on-policy)
    c.runtime.partial_rollout = False  # inline: start each batch one version older and switch weights mid-episode
    c.runtime.switch_after = 32  # inline partial rollouts: decode steps before the mid-episode switch
    c.runtime.max_staleness = 2  # process: no token older than this many versions reaches the loss
    c.runtime.num_samplers = 1  # process: sampler processes
    c.runtime.sampler_groups = 4  # process: groups (task instances x group_size) per sampler generate call
    c.runtime.queue_capacity = config_dict.placeholder(int)  # process: groups the queue holds; None = (max_staleness + 1) * groups_per_step
    c.runtime.ring_capacity = config_dict.placeholder(int)  # versions K kept in the ring buffer; None = the fewest the runtime needs
    c.runtime.hang_timeout_s = 120.0  # process: a sampler with no sign of progress this long while the learner waits is killed and restarted
    c.runtime.sampler_startup_s = 300.0  # process: a new sampler may take this long (imports, compilation) before hang_timeout_s applies to it
    c.runtime.wait_log_s = 30.0  # process: while the learner waits for groups, a status line (queue, samplers) this often

    c.parallel = config_dict.ConfigDict()
    c.parallel.num_devices = 0  # learner data parallelism: devices on the `data` mesh axis (0 = all JAX sees)

    c.train = config_dict.ConfigDict()
    c.train.steps = 200  # RL steps (one batch, one parameter version each)
    c.train.log_every = 1  # steps between metrics.jsonl lines
    c.train.eval_every = 25  # steps between evaluations on held-out seeds
    c.train.checkpoint_every = 25  # steps between Orbax checkpoints of the full train state
    c.train.keep_checkpoints = 2  # checkpoints kept on disk
    c.train.max_nonfinite_skips = 3  # consecutive updates skipped for a non-finite loss or gradient before the run stops

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
    "runtime.mode": ("inline", "process"),
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
        raise ValueError(f"config is missing field(s) {missing}; start config files from jaxrl_async.config.base_config()")
    for field, allowed in CHOICES.items():
        if given[field] not in allowed:
            raise ValueError(f"config.{field} must be one of {allowed}; got {given[field]!r}")

    def positive(field, integer=True):
        v = given[field]
        if (integer and not isinstance(v, int)) or v is None or v <= 0:
            raise ValueError(f"config.{field} must be a positive {'integer' if integer else 'number'}; got {v!r}")

    for f in ("model.d_model", "model.n_layers", "model.n_heads", "model.d_ff", "model.max_len",
              "rl.groups_per_step", "rl.group_size", "optim.num_minibatches", "optim.num_epochs",
              "train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
              "train.keep_checkpoints", "train.max_nonfinite_skips", "eval.episodes", "sampler.chunk", "warmstart.episodes",
              "warmstart.steps", "warmstart.batch_size", "runtime.switch_after", "runtime.num_samplers",
              "runtime.sampler_groups"):
        positive(f)
    for f in ("optim.learning_rate", "optim.grad_clip", "warmstart.learning_rate", "runtime.hang_timeout_s",
              "runtime.sampler_startup_s", "runtime.wait_log_s"):
        positive(f, integer=False)
    if given["rl.advantage"] == "rloo" and given["rl.group_size"] < 2:
        raise ValueError("config.rl.group_size must be >= 2 with rl.advantage='rloo' (leave-one-out needs a peer)")
    batch = given["rl.groups_per_step"] * given["rl.group_size"]
    if batch % given["optim.num_minibatches"]:
        raise ValueError(f"config.optim.num_minibatches ({given['optim.num_minibatches']}) must divide the RL batch "
                         f"rl.groups_per_step * rl.group_size = {batch}")
    if not (isinstance(given["parallel.num_devices"], int) and given["parallel.num_devices"] >= 0):
        raise ValueError(f"config.parallel.num_devices must be an integer >= 0 (0 = all devices); "
                         f"got {given['parallel.num_devices']!r}")
    if not (isinstance(given["runtime.lag"], int) and given["runtime.lag"] >= 0):
        raise ValueError(f"config.runtime.lag must be an integer >= 0; got {given['runtime.lag']!r}")
    if not (isinstance(given["runtime.max_staleness"], int) and given["runtime.max_staleness"] >= 0):
        raise ValueError(f"config.runtime.max_staleness must be an integer >= 0; got {given['runtime.max_staleness']!r}")
    if given["runtime.mode"] == "process":
        if given["runtime.sampler_groups"] > given["rl.groups_per_step"]:
            raise ValueError(f"config.runtime.sampler_groups ({given['runtime.sampler_groups']}) must be <= "
                             f"config.rl.groups_per_step ({given['rl.groups_per_step']}), or the staleness gate never opens")
        cap = given["runtime.queue_capacity"]
        if cap is not None and cap < given["rl.groups_per_step"]:
            raise ValueError(f"config.runtime.queue_capacity ({cap}) must hold at least one batch "
                             f"(config.rl.groups_per_step = {given['rl.groups_per_step']})")
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
    if given["model.d_model"] % given["model.n_heads"]:
        raise ValueError(f"config.model.d_model ({given['model.d_model']}) must be divisible by "
                         f"config.model.n_heads ({given['model.n_heads']})")


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


def model_config_from(config) -> model_lib.ModelConfig:
    """The model of `config.model` over the tasks' shared vocabulary."""
    return model_lib.ModelConfig(vocab_size=envs.TOKENIZER.vocab_size, **config.model.to_dict())


def numerics_from(config) -> model_lib.Numerics:
    """The sampler's inference numerics (`config.numerics`)."""
    return model_lib.Numerics(**config.numerics.to_dict())


def env_factory(config):
    """A zero-argument constructor of the configured task's env."""
    kwargs = config.task.kwargs.to_dict()
    return lambda: envs.make_env(config.task.name, **kwargs)
