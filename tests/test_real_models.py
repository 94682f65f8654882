"""HF model families (Llama / Qwen2 / Qwen3) and chat tasks through the whole RL system.

`model.family` picks the model module (`config.model_module`: transformer or llama), `model.checkpoint`
an HF checkpoint's weights, `task.format='chat'` the chat form of the task (`envs.chat.ChatEnv`) with
its tokenizer's end-of-turn and padding ids. The transformer family's behaviour is covered, unchanged,
by test_train / test_rollout / test_proximal_routes / test_scorer.
"""

import importlib.util
import json
import math
import os
import shutil

import pytest

from jaxrl_async import config as config_lib
from jaxrl_async.cluster import ConfigError, check_startup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_CONFIGS = ("qwen3_0p6b", "qwen2p5_1p5b_instruct", "llama3p2_1b_instruct")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _short(c, steps=2):
    """A few seconds of work per phase: tiny batches, a few warm-start steps, few eval episodes."""
    c.rl.groups_per_step, c.rl.group_size = 2, 2
    c.optim.num_minibatches = 1
    c.warmstart.episodes, c.warmstart.steps, c.warmstart.batch_size = 8, 2, 4
    c.train.steps = steps
    c.train.eval_every = steps
    c.train.checkpoint_every = steps
    c.eval.episodes = 4
    return c


def _tiny_qwen3(tmp_path):
    """A tiny random Qwen3 checkpoint (hf.export) with the shipped tokenizer's files beside it."""
    from jaxrl_async.envs.chat_tokenizer import SHIPPED_TOKENIZER
    from jaxrl_async.models import hf, llama

    cfg = llama.LlamaConfig(vocab_size=602, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                            num_kv_heads=1, head_dim_=16, qk_norm=True, max_len=512,
                            architecture="Qwen3ForCausalLM")
    _, params = llama.init_model(cfg, 123)
    path = str(tmp_path / "tiny-qwen3")
    hf.export(params, cfg, path)
    for f in os.listdir(SHIPPED_TOKENIZER):
        shutil.copy(os.path.join(SHIPPED_TOKENIZER, f), path)
    return path, params


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_checkpoint_configs_fail_at_startup_naming_checkpoint(name, tmp_path):
    c = _load(name)
    assert c.model.checkpoint is None and c.numerics.dtype == "bf16" and c.model.remat
    with pytest.raises(ConfigError, match=r"model\.checkpoint"):
        check_startup(c, str(tmp_path / "run"))
    c.model.checkpoint = str(tmp_path / "does-not-exist")
    with pytest.raises(ConfigError, match=r"model\.checkpoint.*does-not-exist"):
        check_startup(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("field,value,match", [
    ("model.family", "gpt2", r"model\.family"),
    ("task.format", "xml", r"task\.format"),
    ("model.checkpoint", "/some/dir", r"model\.checkpoint.*model\.family"),  # transformer has no checkpoints
    ("task.tokenizer", "/some/dir", r"task\.tokenizer"),  # tokens format has no HF tokenizer
])
def test_family_fields_are_validated(field, value, match, tiny_config):
    c = tiny_config()
    section, key = field.split(".")
    c[section][key] = value
    with pytest.raises(ValueError, match=match):
        config_lib.validate(c)


def test_hf_family_validation_names_fields():
    c = _load("qwen3_tiny")
    config_lib.validate(c)
    c.model.num_kv_heads = 3
    with pytest.raises(ValueError, match=r"model\.num_kv_heads"):
        config_lib.validate(c)
    for mode in ("process", "ray"):  # every runtime runs the HF families
        c = _load("qwen3_tiny")
        c.runtime.mode = mode
        config_lib.validate(c)
    c = _load("qwen3_tiny")
    c.model.max_len = 256
    with pytest.raises(ConfigError, match=r"model\.max_len"):
        check_startup(c, "/tmp/unused-never-created")


def test_dispatch_and_model_configs(tiny_config):
    from jaxrl_async.models import llama, transformer

    c = tiny_config()
    mc = config_lib.model_config_from(c)
    assert isinstance(mc, transformer.ModelConfig) and config_lib.model_module(c) is transformer
    assert config_lib.model_module(mc) is transformer
    q = _load("qwen3_tiny")
    qc = config_lib.model_config_from(q)
    assert isinstance(qc, llama.LlamaConfig) and config_lib.model_module(q) is llama
    assert (qc.architecture, qc.qk_norm, qc.num_kv_heads, qc.head_dim, qc.vocab_size) == (
        "Qwen3ForCausalLM", True, 2, 32, 602)
    env = config_lib.env_factory(q)()
    assert (env.pad_id, env.eot_id) == (0, 2) and env.max_episode_tokens <= qc.max_len


def test_sampler_takes_eot_from_the_env():
    """A chat env whose end-of-turn id differs from the word tokenizer's: turns end on the env's id."""
    import jax
    import numpy as np

    from jaxrl_async.models import llama
    from jaxrl_async.models.transformer import Numerics
    from jaxrl_async.rollout import sampler as sampler_lib

    class FakeChat:
        pad_id, eot_id, max_turn_tokens = 5, 7, 6

        def reset(self, seed):
            return [1, 3, 4]

        def step(self, action):
            from jaxrl_async.envs.base import StepResult
            assert 7 not in action
            return StepResult(observation=[], reward=1.0, done=True, info={"success": True})

    cfg = llama.LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                            num_kv_heads=1, max_len=16)
    g, p = llama.init_model(cfg, 0)
    # A head that always prefers token 7 (the env's EOT; the word tokenizer's EOT is 2).
    p["lm_head"].value = jax.numpy.zeros_like(p["lm_head"].value).at[:, 7].set(50.0)
    s = sampler_lib.Sampler(g, cfg, Numerics(), temperature=1.0, prefill_min=None)
    s.update_params(p, 0)
    trajs, _ = s.generate([FakeChat(), FakeChat()], [0, 1], [0, 0], jax.random.key(0))
    for t in trajs:
        assert t.tokens[-1] == 7 and t.loss_mask[-1] and t.num_turns == 1
    assert np.isfinite(trajs[0].behav_logp).all()


@pytest.mark.slow
def test_qwen3_tiny_trains_and_evaluates(tmp_path):
    from jaxrl_async.train import train_and_evaluate

    c = _short(_load("qwen3_tiny"))
    summary = train_and_evaluate(c, str(tmp_path / "run"), progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["loss/policy"] for r in rows if "loss/policy" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert all(r["train/skipped_nonfinite"] == 0 for r in rows if "train/skipped_nonfinite" in r)
    evals = [r for r in rows if "eval/success_rate" in r]
    assert len(evals) == 2 and summary is not None


@pytest.mark.slow
def test_hf_checkpoint_loads_through_model_checkpoint_and_trains(tmp_path):
    import jax
    import numpy as np

    from jaxrl_async.cluster import RLCluster

    path, params = _tiny_qwen3(tmp_path)
    c = _short(_load("qwen3_tiny"), steps=1)
    c.model.checkpoint = path  # sizes, tokenizer and weights from the checkpoint
    c.model.max_len = 512
    c.warmstart.enabled = False
    cluster = RLCluster(c, str(tmp_path / "run"), resume=False, log=lambda *a: None)
    try:
        assert cluster.model_config.hidden_size == 32 and cluster.model_config.num_layers == 1
        for a, b in zip(jax.tree.leaves(cluster.state.params), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the exported weights, not a random init
        cluster.runtime.start(0)
        m = cluster.train_step(0)
        assert math.isfinite(m["loss/policy"]) and m["train/skipped_nonfinite"] == 0
        assert int(cluster.state.version) == 1
    finally:
        cluster.close()


@pytest.mark.slow
def test_hf_checkpoint_trains_on_the_process_runtime_with_the_dedicated_scorer(tmp_path):
    """A Qwen3 checkpoint through sampler processes and the dedicated old-log-prob scorer:
    both build the Qwen3 structure (not the word transformer) and take the learner's
    published versions; the exact old log-probs reach the loss."""
    from jaxrl_async.train import train_and_evaluate

    path, _ = _tiny_qwen3(tmp_path)
    c = _short(_load("qwen3_tiny"), steps=3)
    c.model.checkpoint = path
    c.model.max_len = 512
    c.warmstart.enabled = False
    c.runtime.mode = "process"
    c.runtime.num_samplers = 1
    c.runtime.sampler_groups = 2
    c.runtime.max_staleness = 1
    c.proximal.source = "dedicated"
    c.train.eval_every = 3
    workdir = str(tmp_path / "run")
    summary = train_and_evaluate(c, workdir, progress=False)
    assert summary["steps"] == 3
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in rows if "loss/policy" in r]
    assert len(train) == 3 and all(math.isfinite(r["loss/policy"]) for r in train)
    assert all(r["train/skipped_nonfinite"] == 0 for r in train)
    assert max(r["staleness/max"] for r in train) <= 1
    assert all(r["queue/taken_total"] > 0 for r in train[-1:])


def test_real_model_benchmark_counts_flops_and_runs_at_micro_shapes():
    import jax
    import numpy as np

    from benchmarks import real_models as rm
    from jaxrl_async.models import llama

    # Qwen3-0.6B: 0.44B non-embedding parameters (its model card), all in matmuls, plus the tied head.
    big = rm.qwen3_config(**rm.SHAPES["qwen3_0p6b"]["model"])
    head = big.hidden_size * big.vocab_size
    assert 0.43e9 < rm.matmul_params(big) - head < 0.45e9
    cfg = rm.qwen3_config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                          num_kv_heads=1, head_dim_=16, max_len=32)
    assert rm.matmul_params(cfg) == 32 * 16 * (2 * 2 + 2 * 1) + 3 * 32 * 64 + 32 * 64
    assert rm.train_flops_per_token(cfg, 16) == 6 * rm.matmul_params(cfg) + 12 * 1 * 2 * 16 * 16
    learner = rm.bench_learner(cfg, 2, 16, steps=1)
    assert learner["tokens_per_s"] > 0 and np.isfinite(learner["model_flops_per_s"])
    decode = rm.bench_decode(cfg, 2, 4, "fp32")
    graphdef, params = llama.init_model(cfg, 0)
    assert decode["weight_bytes"] == sum(x.size * 4 for x in jax.tree.leaves(params)) and decode["tokens_per_s"] > 0
