"""The model-family table (`models.families`): one row per `model.family`, every lookup through it."""

import dataclasses

import pytest

from jaxrl_async import config as config_lib
from jaxrl_async.models import families, hf, llama, transformer
from jaxrl_async.runtime import scorer


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_each_family_round_trips_through_every_lookup(name, tiny_config):
    fam = families.family(name)
    assert fam.name == name and all(callable(getattr(fam.module, f)) for f in families.FUNCTIONS)
    c = tiny_config()
    c.model.family = name
    if fam.is_hf:
        c.model.num_kv_heads, c.model.head_dim = 1, 16
        assert families.by_architecture(fam.hf_architecture) is fam
    config_lib.validate(c)
    model_config = config_lib.model_config_from(c)
    assert isinstance(model_config, fam.config_class)
    assert families.of_model_config(model_config) is fam
    assert config_lib.model_module(c) is config_lib.model_module(model_config) is fam.module
    if fam.is_hf:  # the family's switches reach the model config and its HF config.json
        assert (model_config.qkv_bias, model_config.qk_norm) == (fam.qkv_bias, fam.qk_norm)
        exported = hf.config_to_hf(model_config)
        assert exported["model_type"] == name and exported["architectures"] == [fam.hf_architecture]
        assert families.of_model_config(hf.config_from_hf(exported)) is fam
    # The scorer process gets the family's name and the config's fields as JSON, and builds them back.
    spec = {"family": scorer._family_name(model_config), "model_config": scorer._model_config_fields(model_config)}
    assert spec["family"] == name
    back, module = scorer._build_model_config(spec)
    assert back == model_config and module is fam.module


def test_the_table_covers_the_modules_and_architectures():
    assert families.HF_ARCHITECTURES == hf.SUPPORTED_ARCHITECTURES
    assert {f.module for f in families.FAMILIES.values()} == {transformer, llama}
    assert config_lib.CHOICES["model.family"] == tuple(families.FAMILIES)
    base = llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                             num_kv_heads=1)
    rope = dataclasses.replace(base, rope_scaling=(("factor", 8.0), ("rope_type", "llama3")))
    fields = {**dataclasses.asdict(rope), "rope_scaling": [["factor", 8.0], ["rope_type", "llama3"]]}  # as JSON gives
    assert families.family("llama").config_from_fields(fields) == rope


def test_unknown_family_and_architecture_name_the_field_and_the_choices(tiny_config):
    with pytest.raises(ValueError, match=r"config.model.family must be one of \['transformer', 'llama', 'qwen2', "
                                         r"'qwen3'\]; got 'gpt2'"):
        families.family("gpt2")
    with pytest.raises(ValueError, match=r"x.json: field 'architectures' = \['GPT2LMHeadModel'\] is not supported "
                                         r"\(supported: one of \['LlamaForCausalLM'"):
        families.by_architecture("GPT2LMHeadModel", "x.json")
    c = tiny_config()
    c.model.family = "gpt2"
    with pytest.raises(ValueError, match=r"model.family"):
        config_lib.validate(c)
    c.model.family, c.model.scan_layers = "transformer", True
    with pytest.raises(ValueError, match=r"scan_layers needs an HF model.family \('llama' or 'qwen2' or 'qwen3'\)"):
        config_lib.validate(c)
