"""Tests for the multi-turn agent tasks and the shared tokenizer (pure Python + numpy)."""

import numpy as np
import pytest

from jaxrl_async.envs import (
    ENV_NAMES,
    ERROR_MESSAGES,
    TOKENIZER,
    SearchEnv,
    Tokenizer,
    ToolUseEnv,
    expert_episode,
    make_env,
)

ALL = list(ENV_NAMES)
enc = TOKENIZER.encode
dec = TOKENIZER.decode


def run_episode(env, seed, rng, noise):
    """Counts tokens exactly as the rollout lays them out: prompt + (action + EOT + obs)*."""
    prompt = env.reset(seed)
    n_tokens = len(prompt)
    turns, res = 0, None
    while True:
        action = env.expert_action(rng, noise)
        assert 0 < len(action) <= env.max_turn_tokens
        res = env.step(action)
        turns += 1
        n_tokens += len(action) + 1 + len(res.observation)
        assert "latency_s" in res.info and "error" in res.info
        if res.done:
            break
        assert res.reward == 0.0
    return res, turns, n_tokens


# ---- tokenizer ------------------------------------------------------------------------
def test_tokenizer_round_trip_and_specials():
    tok = Tokenizer()
    assert tok.vocab_size == TOKENIZER.vocab_size
    assert (tok.PAD, tok.BOS, tok.EOT, tok.UNK) == (0, 1, 2, 3)
    ids = list(range(tok.vocab_size))
    assert tok.encode(tok.decode(ids)) == ids
    text = "user 37 wants refund for hat lookup 37 error : unknown tool"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("guess 99") == [tok.token("guess"), tok.number_token(99)]
    assert tok.encode("frobnicate 100 007") == [tok.UNK] * 3
    assert tok.decode([tok.BOS, tok.EOT, tok.PAD, tok.UNK]) == "<bos> <eot> <pad> <unk>"
    assert tok.decode([10_000, -5]) == "<unk> <unk>"
    for n in (0, 7, 99):
        assert tok.number_value(tok.number_token(n)) == n
    assert tok.number_value(tok.token("guess")) is None
    with pytest.raises(ValueError):
        tok.number_token(100)


# ---- registry -------------------------------------------------------------------------
def test_make_env_registry():
    for name in ALL:
        env = make_env(name)
        assert env.name == name
    assert isinstance(make_env("search"), SearchEnv)
    assert isinstance(make_env("tooluse"), ToolUseEnv)
    assert make_env("search", n=32).n == 32
    with pytest.raises(ValueError) as e:
        make_env("chess")
    msg = str(e.value)
    assert "chess" in msg and all(n in msg for n in ALL)


def test_bad_config_rejected():
    with pytest.raises(ValueError):
        SearchEnv(n=200)
    with pytest.raises(ValueError):
        ToolUseEnv(num_orders=3, max_value=5)
    with pytest.raises(ValueError):
        SearchEnv(max_turns=0)


# ---- determinism ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_determinism_by_seed(name):
    def trace(seed):
        env = make_env(name, latency_mean_s=0.5)
        rng = np.random.default_rng(0)
        out = [tuple(env.reset(seed))]
        while not env.done:
            res = env.step(env.expert_action(rng, 0.5))
            out.append((tuple(res.observation), res.reward, res.done, res.info["latency_s"]))
        return out

    assert trace(3) == trace(3)
    traces = {tuple(trace(s)) for s in range(20)}
    assert len(traces) > 5  # instances differ across seeds
    env = make_env(name)
    assert env.reset(11) == env.reset(11)


# ---- expert success and episode lengths -----------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_expert_noiseless_always_succeeds(name):
    env = make_env(name)
    rng = np.random.default_rng(0)
    for seed in range(200):
        res, turns, n_tokens = run_episode(env, seed, rng, 0.0)
        assert res.done and res.reward == 1.0 and res.info["success"] is True
        assert turns <= env.turns_needed <= env.max_turns
        assert res.info["error"] is None
        assert n_tokens <= env.max_episode_tokens


@pytest.mark.parametrize("name", ALL)
def test_noisy_expert_fails_more_and_fits_the_budget(name):
    env = make_env(name)
    rng = np.random.default_rng(1)
    rates, lengths = {}, []
    for noise in (0.0, 0.3, 1.0):
        wins = 0
        for seed in range(300):
            res, turns, n_tokens = run_episode(env, seed, rng, noise)
            assert turns <= env.max_turns
            assert n_tokens <= env.max_episode_tokens
            assert res.reward == float(res.info["success"])
            wins += res.info["success"]
            lengths.append(turns)
        rates[noise] = wins / 300
    assert rates[0.0] == 1.0
    assert rates[1.0] < 0.6
    assert rates[1.0] < rates[0.3] < rates[0.0]
    assert len(set(lengths)) >= 2  # episode lengths vary


def test_search_turns_vary_with_long_tail():
    env = make_env("search")
    rng = np.random.default_rng(2)
    turns = [run_episode(env, s, rng, 0.5)[1] for s in range(300)]
    assert min(turns) == 1 and max(turns) == env.max_turns
    assert len(set(turns)) == env.max_turns


@pytest.mark.parametrize("name", ALL)
def test_worst_case_fits_max_episode_tokens(name):
    """Every turn at max_turn_tokens of garbage plus the longest observations fits."""
    env = make_env(name)
    assert env.max_episode_tokens <= 128
    prompt = env.reset(0)
    n = len(prompt)
    garbage = [TOKENIZER.token("lookup")] * env.max_turn_tokens
    while not env.done:
        res = env.step(garbage)
        n += len(garbage) + 1 + len(res.observation)
    assert n <= env.max_episode_tokens


def test_expert_episode_layout():
    env = make_env("tooluse")
    ep = expert_episode(env, 5, np.random.default_rng(0), 0.0)
    assert ep.success and ep.reward == 1.0 and ep.num_turns == 3
    assert len(ep.tokens) == len(ep.loss_mask) <= env.max_episode_tokens
    assert ep.tokens[0] == Tokenizer.BOS
    # EOT tokens are agent tokens, and each agent turn ends with one.
    eots = [i for i, t in enumerate(ep.tokens) if t == Tokenizer.EOT]
    assert len(eots) == 3 and all(ep.loss_mask[i] == 1 for i in eots)
    assert sum(ep.loss_mask[:7]) == 0  # prompt


# ---- malformed calls -------------------------------------------------------------------
MALFORMED = {
    "search": [
        ("", "empty"),
        ("lookup 3", "unknown_tool"),
        ("guess", "arity"),
        ("guess 3 4", "arity"),
        ("guess hat", "not_number"),
        ("guess 60", "out_of_range"),
        ("<bos> <eot> <pad>", "unknown_tool"),
        ("frobnicate", "unknown_tool"),
    ],
    "tooluse": [
        ("", "empty"),
        ("guess 3", "unknown_tool"),
        ("lookup", "arity"),
        ("refund 3", "arity"),
        ("amount 1 2", "arity"),
        ("lookup user", "not_number"),
        ("refund 3 hat", "not_number"),
        ("<unk> <unk> <unk> <unk>", "unknown_tool"),
    ],
}


@pytest.mark.parametrize("name", ["search", "tooluse"])
def test_malformed_calls_get_error_observations(name):
    env = make_env(name, max_turns=50)
    env.reset(0)
    for i, (text, code) in enumerate(MALFORMED[name]):
        res = env.step(enc(text))
        assert res.info["error"] == code, text
        assert dec(res.observation) == ERROR_MESSAGES[code]
        assert dec(res.observation).startswith("error :")
        assert not res.done and res.reward == 0.0
        assert env.turn == i + 1
    # Raw ids outside the vocabulary and numpy arrays are handled too.
    res = env.step(np.array([10_000, -1, 5], dtype=np.int32))
    assert res.info["error"] == "unknown_tool"
    # The episode still works afterwards: the expert finishes it.
    rng = np.random.default_rng(0)
    while not env.done:
        res = env.step(env.expert_action(rng, 0.0))
    assert res.info["success"]


def test_malformed_turns_use_up_the_budget():
    env = make_env("search")
    env.reset(0)
    for t in range(env.max_turns):
        res = env.step([])
        assert res.done == (t == env.max_turns - 1)
    assert res.reward == 0.0 and res.info["success"] is False
    with pytest.raises(RuntimeError):
        env.step(enc("guess 1"))


# ---- task semantics --------------------------------------------------------------------
def test_search_feedback():
    env = make_env("search")
    env.reset(4)
    target = env._target
    lo_word = dec(env.step(enc(f"guess {max(target - 1, 0)}")).observation)
    assert lo_word == ("higher" if target > 0 else "correct")
    if target > 0:
        res = env.step(enc(f"guess {target}"))
        assert dec(res.observation) == "correct" and res.done and res.reward == 1.0


def test_tooluse_flow_and_errors():
    env = make_env("tooluse", num_orders=2, max_turns=10)
    prompt = dec(env.reset(9)).split()
    assert prompt[:2] == ["<bos>", "user"] and prompt[3:6] == ["wants", "refund", "for"]
    user, item = int(prompt[2]), prompt[6]
    # wrong user
    other = (user + 1) % env.max_value
    assert dec(env.step(enc(f"lookup {other}")).observation) == "error : unknown user"
    obs = dec(env.step(enc(f"lookup {user}")).observation).split()
    assert len(obs) == 6 and obs[0] == obs[3] == "order"
    listing = {obs[2]: int(obs[1]), obs[5]: int(obs[4])}
    order = listing[item]
    bogus = next(v for v in range(env.max_value) if v not in listing.values())
    assert dec(env.step(enc(f"amount {bogus}")).observation) == "error : unknown order"
    assert dec(env.step(enc(f"refund {bogus} 3")).observation) == "error : unknown order"
    amt_obs = dec(env.step(enc(f"amount {order}")).observation).split()
    assert amt_obs[0] == "amount"
    res = env.step(enc(f"refund {order} {amt_obs[1]}"))
    assert res.done and res.reward == 1.0 and dec(res.observation) == "done"


def test_tooluse_wrong_refund_fails():
    env = make_env("tooluse", num_orders=2)
    env.reset(9)
    t = env._target
    d = 1 - t
    res = env.step(enc(f"refund {env._orders[d]} {env._amounts[d]}"))
    assert res.done and res.reward == 0.0 and res.info["success"] is False
    env.reset(9)
    wrong = (env._amounts[t] + 1) % env.max_value
    res = env.step(enc(f"refund {env._orders[t]} {wrong}"))
    assert res.done and res.reward == 0.0


def test_expert_does_not_change_state():
    env = make_env("tooluse")
    env.reset(1)
    rng = np.random.default_rng(0)
    a = [env.expert_action(rng, 0.0) for _ in range(5)]
    assert all(x == a[0] for x in a) and env.turn == 0


# ---- latency ----------------------------------------------------------------------------
def test_latency_off_by_default():
    env = make_env("search")
    env.reset(0)
    assert env.step(enc("guess 1")).info["latency_s"] == 0.0


def test_latency_long_tailed_and_deterministic():
    def latencies(seed, steps=40):
        env = make_env("search", latency_mean_s=0.2, max_turns=steps)
        env.reset(seed)
        return [env.step(enc("guess 99")).info["latency_s"] for _ in range(steps)]

    assert latencies(5) == latencies(5)
    assert latencies(5) != latencies(6)
    lat = np.concatenate([latencies(s) for s in range(100)])
    assert np.all(lat > 0)
    assert 0.15 < lat.mean() < 0.25  # mean ~ latency_mean_s
    median, p99 = np.median(lat), np.quantile(lat, 0.99)
    assert p99 > 5 * median  # long tail
    assert lat.mean() > 1.3 * median  # right-skewed


def test_latency_sleep():
    import time

    env = make_env("search", latency_mean_s=0.01, latency_sigma=0.0, sleep=True)
    env.reset(0)
    t0 = time.perf_counter()
    res = env.step(enc("guess 1"))
    assert res.info["latency_s"] == pytest.approx(0.01)
    assert time.perf_counter() - t0 >= 0.009
