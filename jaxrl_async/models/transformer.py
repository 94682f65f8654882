"""Decoder-only transformer policy with learner and inference numerics.

One Flax NNX module (`Transformer`) serves two numeric paths:

* the **learner** path (`forward_logits`, `token_logprobs`): full-sequence forward,
  float32 everywhere, differentiable in the parameters;
* the **inference** path (`inference_params`, `init_cache`, `decode_step`,
  `sample_token`): incremental KV-cache decoding with the weights cast to bf16/fp16 or
  int8-quantised, plus optional Gaussian logit noise. This is the sampler's engine, and
  its log-probs are the behaviour log-probs `mu` of docs/design.md section 2.

The two paths run the same `Transformer.__call__`; the only differences are the dtype
of the weights handed to it (the compute dtype follows the weights), whether a KV
cache is used, and the logit noise. So at fp32 without noise the two paths agree to
float tolerance, and any mismatch at other numerics is the simulated engine mismatch
the off-policy corrections must handle.

Everything outside the model works on the split state: `init_model` returns
`(graphdef, params)` and the pure functions `nnx.merge` them internally.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_async.models import sharding
from jaxrl_async.models.sharding import constrain

Array = jax.Array
Cache = dict[str, Array]

_DTYPES = ("fp32", "bf16", "fp16", "int8")
# int8 is weight-only quantisation: the weights are dequantised for compute, so the
# activations (and the KV cache) stay float32.
_COMPUTE_DTYPE = {
    "fp32": jnp.float32,
    "bf16": jnp.bfloat16,
    "fp16": jnp.float16,
    "int8": jnp.float32,
}
_ROPE_BASE = 10_000.0
_NORM_EPS = 1e-6
# Output-head init scale, as a std of the initial logits: small, so the initial
# policy is close to uniform over the vocabulary (RL starts from it).
_HEAD_LOGIT_STD = 0.05


# ---------------------------------------------------------------------------
# Configs


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the transformer.

    vocab_size: number of token ids.
    d_model: residual-stream width.
    n_layers: number of transformer blocks.
    n_heads: attention heads; d_model // n_heads is the head dim (must be even: rotary).
    d_ff: hidden width of the MLP.
    max_len: maximum number of positions (the KV cache length; learner sequences
      may not be longer either, so both paths see the same range of positions).
    """

    vocab_size: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    max_len: int = 128

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"ModelConfig.d_model ({self.d_model}) must be divisible by "
                f"ModelConfig.n_heads ({self.n_heads})"
            )
        if (self.d_model // self.n_heads) % 2 != 0:
            raise ValueError(
                f"ModelConfig.d_model // n_heads ({self.d_model // self.n_heads}) must be "
                "even: rotary embeddings rotate pairs of channels"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclasses.dataclass(frozen=True)
class Numerics:
    """How the inference engine computes (the sampler side; the learner is always fp32).

    dtype: "fp32" | "bf16" | "fp16" (weights and activations in that dtype; norm
      statistics, rotary and attention softmax in float32 as real kernels do) or
      "int8" (per-output-channel symmetric weight quantisation, dequantised for
      compute; activations float32).
    logit_noise_std: std of Gaussian noise added to the float32 inference logits,
      simulating kernel-level mismatch beyond the weight dtype.
    """

    dtype: str = "fp32"
    logit_noise_std: float = 0.0

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"Numerics.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        std = self.logit_noise_std
        if (
            not isinstance(std, (int, float))
            or isinstance(std, bool)
            or not math.isfinite(std)
            or std < 0
        ):
            raise ValueError(
                f"Numerics.logit_noise_std must be a finite float >= 0, got {std!r}"
            )

    @property
    def compute_dtype(self) -> Any:
        """The dtype of the inference activations and KV cache."""
        return _COMPUTE_DTYPE[self.dtype]


# ---------------------------------------------------------------------------
# The module


def _normal(key: Array, shape: tuple[int, ...], std: float) -> Array:
    return std * jax.random.normal(key, shape, jnp.float32)


class RMSNorm(nnx.Module):
    """RMS normalisation with a learned per-channel scale.

    The statistics are computed in float32 whatever the input dtype (as fused inference
    kernels do); the output is returned in the input dtype.
    """

    def __init__(self, dim: int):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + _NORM_EPS)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def _rotary(x: Array, positions: Array) -> Array:
    """Rotary position embedding (half-split layout).

    x: [B, T, H, Dh]; positions: [B, T] int. Angles and the rotation in float32 (the
    angle for a large position would be coarse in bf16), result in x's dtype.
    """
    half = x.shape[-1] // 2
    inv_freq = _ROPE_BASE ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [Dh/2]
    angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    cos = jnp.cos(angle)[:, :, None, :]  # [B, T, 1, Dh/2]
    sin = jnp.sin(angle)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x.dtype)


def attention_keys(k, v, positions, cache, layer, dtype):
    """The keys and values a layer attends to, and its causal mask, with or without a KV cache.

    k, v: this call's keys and values `[B, T, Hkv, Dh]` at `positions` `[B, T]`. Without a
    cache they are all there is. With one (`{"k", "v"}` of `[L, B, S, Hkv, Dh]`), they are
    written at their positions into layer `layer` and the layer's whole cache is read back
    in `dtype` (the compute dtype). Returns (keys, values `[B, Tk, Hkv, Dh]`, mask `[B, Tq, Tk]` bool: key
    position <= query position, cache or None). Shared by both model families.
    """
    b = k.shape[0]
    if cache is None:
        keys, values, key_pos = k, v, positions  # [B, T]
    else:
        # Scatter into the whole [L, B, S, H, Dh] buffer (not a per-layer slice that
        # is restacked afterwards): with the cache donated, XLA updates it in place.
        rows = jnp.arange(b)[:, None]  # [B, 1], broadcasts against positions [B, T]
        cache = {
            "k": cache["k"].at[layer, rows, positions].set(k.astype(cache["k"].dtype)),
            "v": cache["v"].at[layer, rows, positions].set(v.astype(cache["v"].dtype)),
        }
        keys, values = cache["k"][layer].astype(dtype), cache["v"][layer].astype(dtype)
        s = keys.shape[1]
        key_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    mask = key_pos[:, None, :] <= positions[:, :, None]  # [B, Tq, Tk]
    return keys, values, mask, cache


class Block(nnx.Module):
    """Pre-norm transformer block: x + Attn(Norm(x)), then x + MLP(Norm(x))."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, f, h, dh = config.d_model, config.d_ff, config.n_heads, config.head_dim
        # Residual-branch output projections are scaled down with depth (GPT-2 style)
        # so the residual stream does not grow with n_layers.
        out_std = 1.0 / math.sqrt(2 * config.n_layers)
        self.n_heads, self.head_dim = h, dh
        self.attn_norm = RMSNorm(d)
        # Weights are [in, out] matrices: "output channel" = last axis (int8 scales).
        self.wq = nnx.Param(_normal(rngs.params(), (d, d), 1.0 / math.sqrt(d)))
        self.wk = nnx.Param(_normal(rngs.params(), (d, d), 1.0 / math.sqrt(d)))
        self.wv = nnx.Param(_normal(rngs.params(), (d, d), 1.0 / math.sqrt(d)))
        self.wo = nnx.Param(_normal(rngs.params(), (d, d), out_std / math.sqrt(d)))
        self.mlp_norm = RMSNorm(d)
        self.w_in = nnx.Param(_normal(rngs.params(), (d, f), 1.0 / math.sqrt(d)))
        self.w_out = nnx.Param(_normal(rngs.params(), (f, d), out_std / math.sqrt(f)))

    def __call__(
        self,
        x: Array,
        positions: Array,
        cache: Cache | None,
        layer: int,
    ) -> tuple[Array, Cache | None]:
        """x: [B, T, D]; positions: [B, T]; cache: the whole-model cache (`init_cache`)
        or None; layer: this block's index into it. Returns (x, updated cache or None).

        Without a cache the keys are this call's T tokens and query i attends to key j
        iff positions[j] <= positions[i] (causal). With a cache, the T new keys are
        written into each row's slots at its positions, and a query at position p
        attends to slots 0..p: slots beyond p (left over from a longer, earlier
        episode in the same row) are masked out and overwritten when reached.
        """
        b, t, _ = x.shape
        dt = x.dtype
        h = self.attn_norm(x)
        heads = ("batch", "length", "act_heads", None)  # a sharded learner splits heads over `tensor`
        q = constrain((h @ self.wq[...].astype(dt)).reshape(b, t, self.n_heads, self.head_dim), heads)
        k = constrain((h @ self.wk[...].astype(dt)).reshape(b, t, self.n_heads, self.head_dim), heads)
        v = constrain((h @ self.wv[...].astype(dt)).reshape(b, t, self.n_heads, self.head_dim), heads)
        q = _rotary(q, positions)
        k = _rotary(k, positions)

        keys, values, mask, cache = attention_keys(k, v, positions, cache, layer, dt)
        # Scores in the compute dtype, softmax in float32 (as attention kernels do).
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, keys).astype(jnp.float32)
        scores = scores / math.sqrt(self.head_dim)
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        attn = jnp.einsum("bhqk,bkhd->bqhd", probs, values).reshape(b, t, -1)
        x = x + attn @ self.wo[...].astype(dt)

        h = self.mlp_norm(x)
        h = constrain(jax.nn.gelu(h @ self.w_in[...].astype(dt)), ("batch", "length", "act_mlp"))
        x = x + h @ self.w_out[...].astype(dt)
        return x, cache


class Transformer(nnx.Module):
    """Decoder-only transformer: token embedding, pre-norm blocks with causal rotary
    attention, final RMSNorm, untied output head.

    The compute dtype follows the weights (the embedding's dtype): float32 params give
    the learner numerics, bf16/fp16 params (from `inference_params`) the inference
    numerics. The head is initialised small so the initial policy is near uniform.
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        d, v = config.d_model, config.vocab_size
        # Unit-scale embeddings: the residual stream starts at RMS ~1.
        self.embed = nnx.Param(_normal(rngs.params(), (v, d), 1.0))
        self.blocks = nnx.List([Block(config, rngs) for _ in range(config.n_layers)])
        self.final_norm = RMSNorm(d)
        # The final norm makes the head input RMS ~1, so this std gives logits of std
        # ~_HEAD_LOGIT_STD.
        self.head = nnx.Param(_normal(rngs.params(), (d, v), _HEAD_LOGIT_STD / math.sqrt(d)))

    def __call__(
        self,
        tokens: Array,
        positions: Array,
        cache: Cache | None = None,
    ) -> tuple[Array, Cache | None]:
        """tokens, positions: [B, T] int32; cache: {"k", "v": [L, B, S, H, Dh]} or None.

        Returns (logits [B, T, V] in the compute dtype, the updated cache or None).
        Logit t is the prediction for the token after tokens[:, t].
        """
        # The residual stream's rows split over (data, fsdp) on a sharded learner, its width whole.
        residual = ("batch", "length", "act_embed")
        x = constrain(jnp.take(self.embed[...], tokens, axis=0), residual)  # [B, T, D], compute dtype
        for i, block in enumerate(self.blocks):
            x, cache = block(x, positions, cache, i)
            x = constrain(x, residual)
        x = self.final_norm(x)
        logits = constrain(x @ self.head[...].astype(x.dtype), ("batch", "length", "act_vocab"))
        return logits, cache


# ---------------------------------------------------------------------------
# Pure functions on the split state


# The logical axes of every parameter, by the last name of its path (models/sharding.py).
PARAM_AXES = {
    ("embed",): ("vocab", "embed"),
    ("head",): ("embed", "vocab"),
    ("wq",): ("embed", "heads"),
    ("wk",): ("embed", "heads"),
    ("wv",): ("embed", "heads"),
    ("wo",): ("heads", "embed"),
    ("w_in",): ("embed", "mlp"),
    ("w_out",): ("mlp", "embed"),
    ("scale",): ("norm",),
}


def param_axes(params: nnx.State):
    """The logical axes of every parameter (a pytree like `params`), for the learner's mesh."""
    return sharding.param_axes(params, PARAM_AXES, "transformer")


def init_model(config: ModelConfig, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    """Builds the model; returns (graphdef, params), params an nnx.State of float32
    nnx.Param leaves. The graphdef is hashable and is passed as a static argument."""
    model = Transformer(config, nnx.Rngs(params=seed))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def _merge(graphdef: nnx.GraphDef, params: nnx.State) -> Transformer:
    model = nnx.merge(graphdef, params)
    if not isinstance(model, Transformer):
        raise TypeError(f"graphdef must describe a Transformer, got {type(model).__name__}")
    return model


def _check_tokens(tokens: Array, rank: int) -> None:
    if tokens.ndim != rank:
        raise ValueError(f"tokens must have rank {rank}, got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer, got {tokens.dtype}")


def _check_inference_inputs(tokens: Array, positions: Array, rank: int, numerics: Numerics, cache: Cache,
                            embed: Array) -> None:
    """The checks shared by `decode_step` (rank 1: `[B]`) and `prefill` (rank 2: `[B, T]`) of
    every model family: integer tokens with positions of the same shape, and a cache and
    params (`embed`, the token embedding) built for `numerics`."""
    _check_tokens(tokens, rank=rank)
    if positions.shape != tokens.shape:
        raise ValueError(f"tokens {tokens.shape} and positions {positions.shape} must both be "
                         f"{'[B]' if rank == 1 else '[B, T]'}")
    dtype = numerics.compute_dtype
    if cache["k"].dtype != dtype or embed.dtype != dtype:
        raise ValueError(
            f"numerics {numerics.dtype!r} computes in {jnp.dtype(dtype).name}, but the cache is "
            f"{cache['k'].dtype} and the params are {embed.dtype}: build them with "
            "init_cache / inference_params for the same numerics"
        )


@functools.partial(jax.jit, static_argnums=0)
def forward_logits(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array) -> Array:
    """Learner forward. tokens [B, T] int -> logits [B, T, V] float32.

    Logit t predicts token t + 1. Positions are 0..T-1 for every row (learner batches
    are left-aligned, one episode per row); T must not exceed `max_len`. Pass float32
    params (the learner's): the compute dtype follows the weights.
    """
    model = _merge(graphdef, params)
    _check_tokens(tokens, rank=2)
    b, t = tokens.shape
    if t > model.config.max_len:
        raise ValueError(f"sequence length {t} exceeds ModelConfig.max_len={model.config.max_len}")
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, _ = model(tokens, positions)
    return logits.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def token_logprobs(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array) -> Array:
    """Learner log-probs of the given tokens. tokens [B, T] -> [B, T] float32.

    out[:, t] = log p(tokens[:, t] | tokens[:, :t]); out[:, 0] = 0 (nothing predicts
    the first token). Differentiable in params; causal, so padding after an episode
    does not change its log-probs.
    """
    logits = forward_logits(graphdef, params, tokens)  # [B, T, V]
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # predictions for tokens 1..T-1
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    return jnp.concatenate([jnp.zeros_like(picked[:, :1]), picked], axis=1)


def _quantise_int8(w: Array) -> Array:
    """Symmetric per-output-channel int8 fake quantisation of an [in..., out] weight.

    One scale per slice of the last axis, max|w| / 127 over the other axes; the
    weight is rounded to int8 levels and dequantised back to float32, so the forward
    computes with exactly the quantised values (weight-only quantisation, float
    activations). Vectors (norm scales) are left in float32, as engines do.
    """
    if w.ndim < 2:
        return w
    axes = tuple(range(w.ndim - 1))
    amax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
    scale = jnp.maximum(amax, jnp.finfo(jnp.float32).tiny) / 127.0
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return q.astype(jnp.float32) * scale


def inference_params(params: nnx.State, numerics: Numerics) -> nnx.State:
    """Converts learner (float32) params to the inference engine's weights.

    fp32: unchanged (the same object). bf16 / fp16: every leaf cast (this sets the
    inference compute dtype). int8: matrices quantised per output channel and stored
    dequantised (float32, so the pytree structure and the graphdef are shared with
    the learner). Call once per weight sync, not per decode step.
    """
    if numerics.dtype == "fp32":
        return params
    if numerics.dtype == "int8":
        return jax.tree.map(_quantise_int8, params)
    dtype = numerics.compute_dtype
    return jax.tree.map(lambda w: w.astype(dtype), params)


def init_cache(config: ModelConfig, batch: int, numerics: Numerics) -> Cache:
    """Empty KV cache for `batch` rows of up to `config.max_len` positions.

    {"k": [L, B, max_len, H, Dh], "v": same}, zeros in the numerics' compute dtype.
    Rows need no reset between episodes: a row restarted at position 0 masks out and
    then overwrites its stale slots.
    """
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    shape = (config.n_layers, batch, config.max_len, config.n_heads, config.head_dim)
    zeros = jnp.zeros(shape, numerics.compute_dtype)
    return {"k": zeros, "v": jnp.zeros_like(zeros)}


def _decode_step(
    graphdef: nnx.GraphDef,
    inf_params: nnx.State,
    cache: Cache,
    tokens: Array,
    positions: Array,
    numerics: Numerics,
    key: Array,
) -> tuple[Array, Cache]:
    """One incremental decoding step for every row, under inference numerics.

    graphdef: static. inf_params: `inference_params(params, numerics)`. cache: from
    `init_cache(config, B, numerics)` or a previous step; `decode_step` DONATES it (its
    buffers are updated in place), so always continue with the returned cache.
    tokens [B] int32: each row's token at its position. positions [B] int32, per row:
    rows may be at different positions, and a row restarted at position 0 reuses its
    slot (entries beyond its position are masked out and overwritten as it advances).
    A position >= max_len has no slot: that row's logp comes back NaN, loudly.
    numerics: static. key: PRNG key for the logit noise (unused when its std is 0).

    Returns (logp [B, V] float32, the log_softmax of the inference distribution of the
    NEXT token, noise included; the updated cache).
    """
    model = _merge(graphdef, inf_params)
    _check_inference_inputs(tokens, positions, 1, numerics, cache, model.embed[...])
    positions = positions.astype(jnp.int32)
    logits, cache = model(tokens[:, None], positions[:, None], cache)
    # The inference logits leave the engine in float32 (as sampler kernels emit them).
    logits = logits[:, 0].astype(jnp.float32)  # [B, V]
    if numerics.logit_noise_std > 0:
        logits = logits + numerics.logit_noise_std * jax.random.normal(key, logits.shape)
    logp = jax.nn.log_softmax(logits, axis=-1)
    in_range = (positions >= 0) & (positions < cache["k"].shape[2])
    return jnp.where(in_range[:, None], logp, jnp.nan), cache


# One compiled function per (graphdef, numerics, batch size) serves a whole rollout.
decode_step = jax.jit(_decode_step, static_argnums=(0, 5), donate_argnums=2)


@jax.jit
def _sample(logp: Array, key: Array, temperature: Array) -> tuple[Array, Array]:
    sample_logp = jax.nn.log_softmax(logp / temperature, axis=-1)
    tokens = jax.random.categorical(key, sample_logp, axis=-1)
    token_logp = jnp.take_along_axis(sample_logp, tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), token_logp


def sample_token(logp: Array, key: Array, temperature: float = 1.0) -> tuple[Array, Array]:
    """Samples one token per row from softmax(logp / temperature).

    logp [B, V] (e.g. from `decode_step`) -> (tokens [B] int32, token_logp [B] float32),
    token_logp the log-prob of the sampled token under the distribution actually
    sampled from (tempered), i.e. the behaviour log-prob `behav_logp`.
    """
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if logp.ndim != 2:
        raise ValueError(f"logp must be [B, V], got shape {logp.shape}")
    return _sample(logp, key, jnp.asarray(temperature, jnp.float32))


def _prefill(
    graphdef: nnx.GraphDef,
    inf_params: nnx.State,
    cache: Cache,
    tokens: Array,
    positions: Array,
    numerics: Numerics,
) -> Cache:
    """Writes known tokens into the KV cache in one batched forward (inference numerics).

    The multi-token counterpart of `decode_step` for context the sampler already knows
    (a prompt, an env observation, a re-read after a weight switch). tokens, positions:
    [B, T] int32; rows may start at different positions and hold different numbers of
    tokens: a position >= max_len marks padding, whose cache write is dropped (and whose
    output is ignored). Each real token attends to its row's slots 0..its position,
    those written by this call included, as if fed one at a time by `decode_step`.
    DONATES the cache; returns the updated cache (the logits are not computed).
    """
    model = _merge(graphdef, inf_params)
    _check_inference_inputs(tokens, positions, 2, numerics, cache, model.embed[...])
    _, cache = model(tokens, positions.astype(jnp.int32), cache)
    return cache


# One compiled function per (graphdef, numerics, batch size, T): callers bucket T.
prefill = jax.jit(_prefill, static_argnums=(0, 5), donate_argnums=2)
