"""Held-out evaluation: one sampler for the run, so its decode loop is traced once."""

import functools

import pytest

from jaxrl_async.rollout import sampler as sampler_lib


@pytest.fixture
def traces(monkeypatch):
    """How often the sampler's decode loop has been traced (its Python body runs once per trace)."""
    count = {"n": 0}
    original = sampler_lib._packed_loop

    @functools.wraps(original)
    def counted(*args, **kwargs):
        count["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(sampler_lib, "_packed_loop", counted)
    return count


def test_evaluations_trace_the_decode_loop_once(tmp_path, tiny_config, traces):
    from jaxrl_async.cluster import RLCluster

    c = tiny_config(1)
    c.warmstart.enabled = False
    c.eval.episodes = 4
    cluster = RLCluster(c, str(tmp_path), log=lambda *a: None)
    try:
        first = cluster.evaluate(0)
        n = traces["n"]
        assert n >= 1
        for step in (1, 2):
            assert set(cluster.evaluate(step)) == set(first)
        assert traces["n"] == n  # the later evaluations reuse the compiled loop
    finally:
        cluster.close()
