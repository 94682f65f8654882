"""The model families: one table from `config.model.family` to its implementation.

Each family names the module that implements it and the model config class it takes. Every
module exposes the same functions (`FUNCTIONS`: init, forward log-probs, inference weights,
KV cache, prefill, decode step, logical axes), so the sampler, learner, proximal routes,
scorer and plan call them without knowing the family. The Hugging Face families share
`models/llama.py` and differ in switches (`qkv_bias` for Qwen2, `qk_norm` for Qwen3) and in
their HF architecture name, which `models/hf.py` reads from and writes to `config.json`.

Lookups: `family(name)` (a run config's `model.family`), `by_architecture(arch)` (a
checkpoint's `architectures[0]`), `of_model_config(cfg)` (a built model config, or its fields
as a dict, as the scorer's process receives them).
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any, Optional

from jaxrl_async.models import llama, transformer

# What every family's module implements (checked for each family at import).
FUNCTIONS = ("init_model", "token_logprobs", "inference_params", "init_cache", "prefill", "decode_step",
             "param_axes")


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One `model.family`: its module and config class; for an HF family its architecture and switches."""

    name: str
    module: ModuleType
    config_class: type
    hf_architecture: Optional[str] = None  # None: the library's own model, no HF checkpoint
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (Qwen3)

    @property
    def is_hf(self) -> bool:
        return self.hf_architecture is not None

    def config_from_fields(self, fields: dict) -> Any:
        """The model config from its fields as `dataclasses.asdict` gave them, after a JSON round trip
        (the only non-JSON field, llama's `rope_scaling`, comes back as lists: made a tuple again)."""
        fields = dict(fields)
        if fields.get("rope_scaling") is not None:
            fields["rope_scaling"] = tuple((k, v) for k, v in fields["rope_scaling"])
        return self.config_class(**fields)


_TABLE = (
    ModelFamily("transformer", transformer, transformer.ModelConfig),
    ModelFamily("llama", llama, llama.LlamaConfig, "LlamaForCausalLM"),
    ModelFamily("qwen2", llama, llama.LlamaConfig, "Qwen2ForCausalLM", qkv_bias=True),
    ModelFamily("qwen3", llama, llama.LlamaConfig, "Qwen3ForCausalLM", qk_norm=True),
)
FAMILIES: dict[str, ModelFamily] = {f.name: f for f in _TABLE}
HF_FAMILIES = tuple(f.name for f in _TABLE if f.is_hf)
HF_ARCHITECTURES = tuple(f.hf_architecture for f in _TABLE if f.is_hf)

for _f in _TABLE:  # a family whose module lacks a function fails here, not mid-run
    _missing = [fn for fn in FUNCTIONS if not callable(getattr(_f.module, fn, None))]
    if _missing:
        raise ImportError(f"model family {_f.name!r}: {_f.module.__name__} lacks {_missing}")


def family(name: str) -> ModelFamily:
    """The family of `config.model.family` = name; ValueError naming the field and the choices."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"config.model.family must be one of {list(FAMILIES)}; got {name!r}") from None


def by_architecture(arch: str, source: str = "config.json") -> ModelFamily:
    """The HF family whose checkpoints name `arch` in `architectures`; ValueError naming `source`."""
    for f in _TABLE:
        if f.is_hf and f.hf_architecture == arch:
            return f
    raise ValueError(f"{source}: field 'architectures' = {[arch]!r} is not supported "
                     f"(supported: one of {list(HF_ARCHITECTURES)})")


def of_model_config(model_config) -> ModelFamily:
    """The family of a built model config (`transformer.ModelConfig`, `llama.LlamaConfig`) or of its
    fields as a dict (an HF family's carry `architecture`)."""
    if isinstance(model_config, transformer.ModelConfig):
        return FAMILIES["transformer"]
    if isinstance(model_config, llama.LlamaConfig):
        return by_architecture(model_config.architecture, "model config")
    if isinstance(model_config, dict):
        if "architecture" in model_config:
            return by_architecture(model_config["architecture"], "model config")
        return FAMILIES["transformer"]
    raise TypeError(f"not a model config: {type(model_config).__name__}")
