"""The warm start's demonstrations and cache: keyed by everything that shapes them.

The SFT update is replaced by one that records its batches, so these tests compile nothing.
"""

import os

import numpy as np
import pytest

from jaxrl_async import config as config_lib
from jaxrl_async.learner import warmstart


@pytest.fixture
def recorded(monkeypatch):
    """The token rows every warm-start step trained on (the update itself does nothing)."""
    rows = []

    def make_sft_update(*args, **kwargs):
        def update(state, batch):
            rows.extend(np.asarray(batch["tokens"]).tolist())
            return state, {"sft/nll": 0.0}
        return update

    monkeypatch.setattr(warmstart.learner_lib, "make_sft_update", make_sft_update)
    return rows


def _setup(c):
    model_config = config_lib.model_config_from(c)
    graphdef, params = config_lib.init_params(c, model_config)
    return graphdef, params, model_config


def _expected_rows(c, model_config):
    seeds = np.random.default_rng([c.seed, 7]).integers(0, c.eval.seed_offset, c.warmstart.episodes)
    demos = warmstart.demonstrations(config_lib.env_factory(c), seeds, c.warmstart.noise, c.seed, model_config.max_len)
    return {tuple(r) for r in demos["tokens"].tolist()}


@pytest.mark.parametrize("field, first, second", [("noise", 1.0, 0.0), ("episodes", 64, 32)])
def test_fresh_run_in_a_reused_workdir_uses_its_own_demonstrations(tmp_path, tiny_config, recorded, field,
                                                                      first, second):
    workdir = str(tmp_path)
    for value in (first, second):
        c = tiny_config()
        c.warmstart.steps, c.warmstart[field] = 8, value
        graphdef, params, model_config = _setup(c)
        recorded.clear()
        warmstart.run_warmstart(c, graphdef, params, model_config, workdir, log=lambda *a: None)
        expected = _expected_rows(c, model_config)
        assert recorded and all(tuple(r) in expected for r in recorded), f"{field}={value}: stale demonstrations"
        with np.load(os.path.join(workdir, "demonstrations.npz")) as f:
            assert f["tokens"].shape[0] == c.warmstart.episodes


def test_warmstart_cache_key_covers_the_demonstration_seeds_and_the_format(tmp_path, tiny_config, recorded,
                                                                           monkeypatch):
    c = tiny_config()
    c.warmstart.steps, c.warmstart.cache_dir = 2, str(tmp_path / "cache")
    graphdef, params, model_config = _setup(c)

    def entries(workdir):
        os.makedirs(tmp_path / workdir)
        warmstart.warmstart_params(c, graphdef, params, model_config, str(tmp_path / workdir), log=lambda *a: None)
        return len(os.listdir(c.warmstart.cache_dir))

    assert entries("a") == 1
    assert entries("b") == 1  # the same setting: served from the cache
    c.eval.seed_offset += 1  # picks the demonstrations' task seeds: a new entry
    assert entries("c") == 2
    monkeypatch.setattr(warmstart, "FORMAT_VERSION", warmstart.FORMAT_VERSION + 1)  # the warm start's code changed
    assert entries("d") == 3
