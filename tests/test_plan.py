"""`python -m jaxrl_async.plan`: per-device memory from shapes, and the logical axes it rests on."""

import importlib.util
import os

import jax
import pytest

from jaxrl_async import config as config_lib
from jaxrl_async import plan as plan_lib
from jaxrl_async.learner import mesh as mesh_lib
from jaxrl_async.models import llama, sharding
from jaxrl_async.models import transformer as model_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("family,kwargs", [
    ("llama", dict(o_bias=True, mlp_bias=True)),
    ("qwen2", dict(qkv_bias=True, tie_word_embeddings=True)),
    ("qwen3", dict(qk_norm=True)),
])
def test_every_parameter_has_logical_axes(family, kwargs):
    cfg = llama.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, **kwargs)
    params = jax.eval_shape(lambda: llama.init_model(cfg, 0)[1])
    axes = jax.tree.leaves(llama.param_axes(params), is_leaf=lambda a: isinstance(a, sharding._Leaf))
    shapes = [x.shape for x in jax.tree.leaves(params)]
    assert len(axes) == len(shapes) and all(len(a.axes) == len(s) for a, s in zip(axes, shapes))
    assert all(set(a.axes) <= set(sharding.RULES) for a in axes)


def test_unknown_parameter_is_named():
    _, params = model_lib.init_model(model_lib.ModelConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2,
                                                           d_ff=16, max_len=8), 0)
    table = {k: v for k, v in model_lib.PARAM_AXES.items() if k != ("w_out",)}
    with pytest.raises(ValueError, match=r"blocks\.0\.w_out has no logical axes"):
        sharding.param_axes(params, table, "transformer")


def test_mesh_spec_rules():
    sizes = {"data": 2, "fsdp": 4, "tensor": 2}
    assert sharding.mesh_spec(("embed", "heads"), (64, 32), sizes) == jax.sharding.PartitionSpec("fsdp", "tensor")
    # A dimension the axis does not divide stays whole; a size-1 axis is left out.
    assert sharding.mesh_spec(("embed", "kv_heads"), (64, 3), sizes) == jax.sharding.PartitionSpec("fsdp")
    assert sharding.mesh_spec(("embed", "mlp"), (64, 32), {"fsdp": 1, "tensor": 1}) == jax.sharding.PartitionSpec()
    assert sharding.mesh_spec(("batch", "length"), (16, 5), sizes) == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert sharding.shard_shape((64, 32), jax.sharding.PartitionSpec("fsdp", "tensor"), sizes) == (16, 16)


def test_bad_mesh_product_names_the_fields(tiny_config):
    c = tiny_config()
    c.parallel.num_devices, c.parallel.data, c.parallel.fsdp = 8, 2, 2
    with pytest.raises(ValueError, match=r"config.parallel.data \* fsdp \* tensor = 2 \* 2 \* 1 = 4.*num_devices = 8"):
        config_lib.validate(c)
    with pytest.raises(ValueError, match=r"config.parallel.data \* fsdp \* tensor = 2 \* 2 \* 1 = 4 devices.*exceeds"):
        mesh_lib.make_mesh(data=2, fsdp=2)
    with pytest.raises(ValueError, match=r"config.parallel.fsdp must be an integer >= 1"):
        mesh_lib.make_mesh(fsdp=0)


def test_plan_of_a_small_config_counts_the_split_params(tiny_config):
    c = tiny_config()
    c.parallel.fsdp = 2
    c.proximal.source = "ewma"
    p = plan_lib.plan(c, num_devices=4)
    assert p.mesh == {"data": 2, "fsdp": 2, "tensor": 1}
    _, params = model_lib.init_model(config_lib.model_config_from(c), 0)
    leaves = jax.tree.leaves(params)
    vectors = sum(x.size for x in leaves if x.ndim == 1)  # norm scales: whole
    assert p.num_params == sum(x.size for x in leaves)
    assert p.learner["params"] == 4 * ((p.num_params - vectors) // 2 + vectors)
    assert p.learner["gradients"] == p.learner["params"] == p.learner["ewma"]
    assert p.learner["optimizer"] == 2 * p.learner["params"]
    assert p.rows == 16 // (2 * 4)  # 16 rows, 2 minibatches, 4 row shards
    assert p.learner["activations"] > 0 and all(p.fits().values())
    text = plan_lib.report(p)
    assert "fits" in text and "H100 80 GB" in text and "fsdp=2" in text


def test_qwen3_8b_plan_fits_eight_h100s_only_sharded():
    spec = importlib.util.spec_from_file_location("qwen3_8b_fsdp8", os.path.join(REPO, "configs", "qwen3_8b_fsdp8.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    p = plan_lib.plan(c, vocab_size=151936)
    assert p.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
    assert p.num_params == pytest.approx(8.19e9, rel=0.01)  # Qwen3-8B
    assert p.fits()["H100 80 GB"] and p.learner_total < 0.9 * 80e9
    c.parallel.fsdp, c.parallel.data = 1, 8  # the same run, data parallel: every device holds the whole state
    whole = plan_lib.plan(c, vocab_size=151936)
    assert not any(whole.fits().values())
    assert whole.learner["optimizer"] == pytest.approx(8 * p.learner["optimizer"], rel=1e-3)


def test_sampler_tensor_field_is_checked_and_planned(tiny_config):
    from types import SimpleNamespace

    from jaxrl_async.rollout.sampler import Sampler
    from jaxrl_async.runtime import base as runtime_base

    c = tiny_config()
    c.sampler.tensor = 0
    with pytest.raises(ValueError, match=r"config.sampler.tensor must be an integer >= 1"):
        config_lib.validate(c)
    c.sampler.tensor = len(jax.devices()) + 1
    with pytest.raises(ValueError, match=r"config.sampler.tensor = \d+ devices, but this process sees"):
        runtime_base.sampler_mesh(c)
    graphdef, _ = model_lib.init_model(config_lib.model_config_from(c), 0)
    fsdp_mesh = SimpleNamespace(shape={"data": 1, "fsdp": 2, "tensor": 1})
    with pytest.raises(ValueError, match=r"sampler's mesh must have data = fsdp = 1"):
        Sampler(graphdef, config_lib.model_config_from(c), model_lib.Numerics("fp32"), mesh=fsdp_mesh)
    # A process-runtime sampler on 2 devices holds about half the weights and KV cache of one on 1.
    c.runtime.mode = "process"
    c.model.n_heads = 2
    c.sampler.tensor = 1
    one = plan_lib.plan(c, num_devices=1).sampler
    c.sampler.tensor = 2
    two = plan_lib.plan(c, num_devices=1).sampler
    assert two["version"] == one["version"] // 2 and two["kv_cache"] == one["kv_cache"] // 2
