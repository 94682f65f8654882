"""τ2-bench through tau2's own code (jaxrl_async/tau2): the gold check on a subset of each
domain, the token stream against the chat template (ChatML on the shipped tokenizer, Llama 3
on a small tokenizer trained here), malformed turns, the user simulator's failures, and the
results file under tau2's evaluator. Skipped without the `tau2` package (see docs/tau2.md)."""

import http.server
import socket
import sys
import threading
import time

import numpy as np
import psutil
import pytest

pytest.importorskip("tau2")

from jaxrl_async.envs import chat_tokenizer as ct  # noqa: E402
from jaxrl_async.models import hf  # noqa: E402
from jaxrl_async.tau2 import chat, gold, results  # noqa: E402
from jaxrl_async.tau2 import env as tau2_env_lib  # noqa: E402
from jaxrl_async.tau2.env import Tau2Env  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_chat_env import _save_llama  # noqa: E402

BIG = dict(max_turns=200, max_context=1 << 30)


@pytest.fixture(scope="module")
def chatml():
    return hf.load_tokenizer(ct.SHIPPED_TOKENIZER)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A Llama-3-like tokenizer (Llama-3 specials, pre-tokenizer, JSON tool-call template)
    trained on one mock conversation in its own format."""
    root = tmp_path_factory.mktemp("tau2_llama")
    boot = hf.load_tokenizer(_save_llama(ct.train_bpe(["x"], ct.LLAMA3_SPECIALS, vocab_size=300,
                                                      pattern=ct.LLAMA3_PATTERN), str(root / "boot")))
    env = Tau2Env(boot, domain="mock", user="solo", **BIG)
    gold.run_episode(env, 0)
    tok = ct.train_bpe([env.conversation_text()], ct.LLAMA3_SPECIALS, vocab_size=600, pattern=ct.LLAMA3_PATTERN)
    return hf.load_tokenizer(_save_llama(tok, str(root / "tok")))


def _assert_stream(env, tokens, mask):
    """The laid-out episode is the template's render of the agent's view, token for token."""
    ref = env.tokenizer.render_chat_template(env._msgs, tools=env.tools, add_generation_prompt=not env.done)
    assert env.conversation_text() == ref
    assert tokens == env.tokenizer.encode(ref, add_special_tokens=False)
    ends = np.flatnonzero(np.diff(np.r_[np.asarray(mask), 0]) == -1)
    assert len(ends) == env.turn and all(tokens[i] == env.eot_id for i in ends)


# (domain, user, tasks): small subsets, ~1 s of tau2 evaluation each; all tasks run in the check CLI.
SUBSETS = [("mock", "scripted", None), ("mock", "solo", None), ("telecom", "scripted", 3),
           ("retail", "scripted", 2), ("airline", "scripted", 1)]


@pytest.mark.parametrize("domain,user,n", SUBSETS)
def test_gold_check_subset(chatml, domain, user, n, tmp_path):
    env = Tau2Env(chatml, domain=domain, user=user, **BIG)
    ids = [t.id for t in env.tasks[:n]] if n else None
    res = gold.check(env, ids)
    assert res.ok, res.failed
    if domain == "mock" and user == "scripted":  # the one mock task whose gold actions cannot pass
        assert res.line() == "mock: 8/9 tasks scored 1.0"
        assert [t for t, o in zip(res.task_ids, res.oracle) if o < 1] == ["update_task_with_history_and_env_assertions"]
    else:
        assert res.scored == len(res.rewards) - sum(o < 1 for o in res.oracle)
    if domain in ("retail", "mock"):  # the results file re-evaluates to the same rewards under tau2's evaluator
        path = results.save(results.make(env, res.simulations, num_trials=1, agent="gold"), str(tmp_path), domain)
        loaded = results.load(path)
        assert [s.reward_info.reward for s in loaded.simulations] == res.rewards
        assert results.reevaluate(loaded, domain, env.solo) == res.rewards


@pytest.mark.slow
def test_evaluation_in_a_process_pool_scores_as_in_process(chatml):
    # Two retail tasks (their evaluator rebuilds and hashes the database) played by the gold agent, plus a
    # failing ending, evaluated here and in a spawned worker: the same reward info, field for field.
    infos = {}
    for procs in (0, 1):
        env = Tau2Env(chatml, domain="retail", user="scripted", eval_processes=procs, **BIG)
        ids = [t.id for t in env.tasks[:2]]
        res = gold.check(env, ids)
        env.reset(0)
        ended = _say(env, "Goodbye.###STOP###")
        while not ended.done:
            ended = _say(env, "Goodbye.")
        sims = res.simulations + [env.simulation]
        infos[procs] = ([s.reward_info.model_dump() for s in sims], res.rewards + [ended.reward])
    assert infos[1] == infos[0]
    assert infos[0][1][:2] == [1.0, 1.0] and infos[0][1][2] == 0.0
    pids = [p.pid for p in tau2_env_lib._EVAL_POOLS[1]._processes.values()]
    tau2_env_lib.shutdown_eval_pools()  # its worker would outlive the test (and confuse child-process checks)
    assert pids and not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
    with pytest.raises(ValueError, match="task.kwargs.eval_processes must be an integer >= 0"):
        Tau2Env(chatml, domain="mock", eval_processes=-1)


@pytest.mark.parametrize("family", ["chatml", "llama3"])
@pytest.mark.parametrize("domain,user", [("mock", "scripted"), ("telecom", "solo")])
def test_token_stream_is_the_template_render(chatml, llama, family, domain, user):
    tok = chatml if family == "chatml" else llama
    env = Tau2Env(tok, domain=domain, user=user, **BIG)
    assert env.format == family
    tokens, mask = gold.run_episode(env, 1)
    assert env.done and env.simulation.reward_info.reward == 1.0
    _assert_stream(env, tokens, mask)


@pytest.fixture(scope="module")
def last_turn_think(tmp_path_factory):
    """The shipped tokenizer with a ChatML template that, like Qwen3's, gives only the last
    assistant tool-call message an empty think block: a render of the conversation so far is
    then no prefix of the render once the turn's results follow."""
    import shutil

    path = str(tmp_path_factory.mktemp("think_tok") / "tok")
    shutil.copytree(ct.SHIPPED_TOKENIZER, path)
    head = "{{- '<|im_start|>' + message.role }}"
    assert ct.CHATML_TEMPLATE.count(head) == 1
    think = "{%- if loop.last %}{{- '\\n<think>\\n\\n</think>\\n' }}{%- endif %}"
    template = ct.CHATML_TEMPLATE.replace(head, head + think)
    with open(f"{path}/chat_template.jinja", "w") as f:
        f.write(template)
    return hf.load_tokenizer(path)


@pytest.mark.parametrize("domain,user", [("mock", "scripted"), ("telecom", "solo")])
def test_observations_survive_a_template_that_rewrites_the_last_turn(chatml, last_turn_think, domain, user):
    env = Tau2Env(last_turn_think, domain=domain, user=user, **BIG)
    ref = Tau2Env(chatml, domain=domain, user=user, **BIG)
    env.reset(0)
    call = gold.plan(env, env.task)[0]
    assert call.startswith("<think>\n\n</think>\n\n<tool_call>")  # the template's own form of a call
    msgs = env._msgs + [chat.template_call("x", {})]
    assert not env.render(msgs + [{"role": "tool", "content": "r"}], True).startswith(env.render(msgs, False))
    gold.run_episode(env, 0)
    gold.run_episode(ref, 0)
    assert env.simulation.reward_info.reward == ref.simulation.reward_info.reward == 1.0
    assert env._texts[2::3] == ref._texts[2::3]  # the same observations after each end-of-turn token


def _say(env, text):
    return env.step(env.encode(text) + [env.eot_id])


def test_malformed_turns_get_error_text_and_cost_a_turn(chatml):
    env = Tau2Env(chatml, domain="mock", user="solo", max_turns=5, max_context=1 << 30)
    tokens = list(env.reset(0))
    mask = [0] * len(tokens)
    cases = [("<tool_call>\n{\"name\": \"create_task\", \"arguments\": {\"user_id\": 1}\n</tool_call>", "bad_json"),
             ("", "empty"),
             (env.call_text("create_tsk", {"user_id": "user_1"}), None),  # unknown tool: tau2's own error
             ("<think>\nplan\n</think>\n\n" + env.call_text("create_task", {"user_id": "user_1"}), None)]
    for turn, (text, code) in enumerate(cases, 1):
        ids = env.encode(text)
        res = env.step(ids + [env.eot_id])
        tokens += ids + [env.eot_id] + res.observation
        mask += [1] * (len(ids) + 1) + [0] * len(res.observation)
        assert env.turn == turn and not res.done and res.info["error"] == code
        content = env._msgs[-1]["content"]
        if code is not None:
            assert content == chat.MALFORMED[code]
        else:  # executed by tau2's Environment: its error text for an unknown tool / a missing argument
            assert content.startswith("Error:"), content
    _assert_stream(env, tokens, mask)
    # The turn budget: the 5th turn ends the episode as tau2's max_steps, reward 0.
    res = _say(env, "<tool_call>{</tool_call>")
    assert res.done and res.reward == 0.0 and res.info["termination"] == "max_steps"
    assert env.simulation.reward_info.reward == 0.0
    # tau2's solo rule: text that is not the stop ends the episode as an agent error.
    env.reset(0)
    res = _say(env, "Hello, I will create the task.")
    assert res.done and res.reward == 0.0 and res.info["termination"] == "agent_error"


def test_an_evaluation_that_raises_scores_zero_and_the_episode_ends(chatml):
    # tau2's evaluator raises ValueError on this task when the agent never created the task it asserts on.
    env = Tau2Env(chatml, domain="mock", user="scripted", task_ids=["create_task_1_with_env_assertions"],
                  max_turns=3, max_context=1 << 30)
    env.reset(0)
    res = _say(env, "Hello, how can I help?")
    while not res.done:
        res = _say(env, "Goodbye.")
    assert res.reward == 0.0 and env.evaluator_errors == 1 and "ValueError" in env.evaluator_error
    assert env.simulation.reward_info.info["evaluator_error"] == env.evaluator_error


def test_parse_turn_think_rule():
    text = '<think>\nI should call it.\n</think>\n\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    assert chat.parse_turn(text, "chatml") == ("call", ("f", {"a": 1}, None))
    assert chat.parse_turn("<think>x</think>Hello", "chatml") == ("text", "Hello")
    assert chat.parse_turn('{"name": "f", "parameters": {"a": 1}}', "llama3") == ("call", ("f", {"a": 1}, None))
    assert chat.parse_turn('{"name": "f", "parameters": ', "llama3") == ("malformed", "bad_json")
    assert chat.parse_turn("<think>only thoughts</think>", "chatml") == ("malformed", "empty")


class _Silent(http.server.BaseHTTPRequestHandler):
    """An endpoint that accepts the request and never answers in time."""

    def do_POST(self):  # noqa: N802
        time.sleep(5)

    def log_message(self, *args):
        pass


class _FakeUserModel(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint: the user asks for the task, then stops."""

    replies = ["Please create a task called 'Important Meeting' for user_1.", "###STOP###"]

    def do_POST(self):  # noqa: N802
        import json

        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.calls.append(body)
        text = self.replies[min(len(self.server.calls), len(self.replies)) - 1]
        data = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": text}}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_user_is_tau2_user_simulator_at_the_endpoint(chatml):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeUserModel)
    server.calls = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = Tau2Env(chatml, domain="mock", user="openai", user_model="openai/user-sim",
                      user_api_base=f"http://127.0.0.1:{server.server_address[1]}/v1", user_timeout_s=10,
                      user_retries=0, max_turns=5, max_context=1 << 30, task_ids=["create_task_1"])
        env.reset(0)
        assert env._msgs[-1] == {"role": "user", "content": _FakeUserModel.replies[0]}
        # tau2's user prompt (guidelines + the task's scenario) went to the endpoint.
        assert "create a task" in server.calls[0]["messages"][0]["content"].lower()
        res = _say(env, env.call_text("create_task", {"user_id": "user_1", "title": "Important Meeting"}))
        assert not res.done
        res = _say(env, "I created the task 'Important Meeting'.")
        assert res.done and res.reward == 1.0 and res.info["termination"] == "user_stop"
        assert env.user_errors == 0 and len(server.calls) == 2
    finally:
        server.shutdown()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("endpoint", ["silent", "refused"])
def test_user_failure_is_discarded_not_failed(chatml, endpoint):
    server = None
    if endpoint == "silent":
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Silent)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
    else:
        port = _closed_port()
    try:
        env = Tau2Env(chatml, domain="mock", user="openai", user_model="openai/user-sim",
                      user_api_base=f"http://127.0.0.1:{port}/v1", user_timeout_s=0.5, user_retries=0,
                      max_turns=5, max_context=1 << 30)
        t0 = time.perf_counter()
        env.reset(0)  # the user's first message fails
        res = _say(env, env.call_text("create_task", {"user_id": "user_1", "title": "x"}))
        assert time.perf_counter() - t0 < 30
        assert res.done and res.reward == 0.0 and res.info["user_error"] and not res.info["success"]
        assert res.info["termination"] == "user_error" and env.user_errors == 1 and env.simulation is None
    finally:
        if server is not None:
            server.shutdown()


def test_bad_kwargs_name_the_field(chatml):
    with pytest.raises(ValueError, match="task.kwargs.domain"):
        Tau2Env(chatml, domain="bank")
    with pytest.raises(ValueError, match="task.kwargs.split"):
        Tau2Env(chatml, domain="retail", split="dev")
    with pytest.raises(ValueError, match="task.kwargs.user_model"):
        Tau2Env(chatml, domain="mock", user="openai")
    with pytest.raises(ValueError, match="task.kwargs.user_api_base"):
        Tau2Env(chatml, domain="mock", user="openai", user_model="openai/x")
    with pytest.raises(ValueError, match="task.kwargs.user='solo'"):
        Tau2Env(chatml, domain="retail", user="solo")


def _load_config(name):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_config_validation_names_the_field(tmp_path):
    from jaxrl_async import cluster
    from jaxrl_async import config as config_lib

    c = _load_config("tau2_tiny")
    config_lib.validate(c)
    env = config_lib.env_factory(c)()
    assert isinstance(env, Tau2Env) and env.solo and env.max_episode_tokens == c.model.max_len
    for field, value, match in [("format", "tokens", "task.format must be 'chat'"),
                                ("domain", "bank", "task.kwargs.domain must be one of"),
                                ("user", "llm", "task.kwargs.user must be one of")]:
        bad = _load_config("tau2_tiny")
        if field == "format":
            bad.task.format = value
        else:
            bad.task.kwargs[field] = value
        with pytest.raises(ValueError, match=match):
            config_lib.validate(bad)
    bad = _load_config("tau2_tiny")
    del bad.task.kwargs["domain"]
    with pytest.raises(ValueError, match="task.kwargs.domain must be set"):
        config_lib.validate(bad)
    bad = _load_config("tau2_tiny")
    bad.task.kwargs.split = "dev"
    with pytest.raises(cluster.ConfigError, match="task.kwargs.split"):
        cluster.check_startup(bad, str(tmp_path / "run"))
    # The paper configs stop at startup without a checkpoint, then without the user endpoint.
    for domain in ("retail", "airline", "telecom"):
        c = _load_config(f"tau2_{domain}_qwen3")
        with pytest.raises(cluster.ConfigError, match="model.checkpoint"):
            cluster.check_startup(c, str(tmp_path / domain))
    c.model.checkpoint = ""  # random init at the default sizes: the user endpoint is next
    with pytest.raises(cluster.ConfigError, match="task.kwargs.user_model"):
        cluster.check_startup(c, str(tmp_path / "telecom"))
    c.task.kwargs.user_model = "openai/user"
    with pytest.raises(cluster.ConfigError, match="task.kwargs.user_api_base"):
        cluster.check_startup(c, str(tmp_path / "telecom"))


@pytest.mark.slow
def test_tau2_tiny_trains_end_to_end_then_evaluates(tmp_path):
    """configs/tau2_tiny.py through the trainer (tau2 episodes sampled, scored by tau2's evaluator,
    one RL step; compilation dominates on a CPU), then `evaluate` on the run's latest version:
    its results file re-evaluates to the same rewards under tau2's evaluator."""
    import json

    from jaxrl_async.tau2 import evaluate
    from jaxrl_async.train import train_and_evaluate

    c = _load_config("tau2_tiny")
    c.task.kwargs.max_turns = 2
    c.task.kwargs.max_turn_tokens = 32
    c.warmstart.enabled = False
    c.proximal.source = "bypass"  # no separate log-prob program to compile
    c.rl.groups_per_step, c.rl.group_size = 2, 2
    c.optim.num_minibatches = 1
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 1, 1, 1
    c.eval.episodes = 4  # the training batch's shapes: one sampler program
    run = tmp_path / "run"
    s = train_and_evaluate(c, str(run), resume=False, progress=False)
    assert s["steps"] == 1 and set(s["evals"]) == {"0", "1"}
    with open(run / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    step = next(r for r in rows if "rollout/turns_mean" in r)
    assert step["rollout/turns_mean"] >= 1 and 0.0 <= step["rollout/return_mean"] <= 1.0
    # learner.length_buckets: episodes of ~1.4k tokens train in a batch shorter than the 2048-token context.
    assert step["perf/batch_len"] < c.model.max_len and step["perf/batch_len"] % 256 == 0

    # 2 tasks x 2 trials = the same 4-episode batch shape.
    report = evaluate.evaluate(c, trials=2, out=str(tmp_path / "eval"), workdir=str(run),
                               task_ids=["create_task_1", "update_task_1"])
    assert set(report.rewards) == {"create_task_1", "update_task_1"}
    assert all(len(r) == 2 for r in report.rewards.values()) and report.user_errors == 0
    assert set(report.summary) == {"avg", "pass^1", "pass^2"}
    assert report.table().splitlines()[-1].startswith("mock: avg@2 ")
    loaded = results.load(report.path)
    assert loaded.info.agent_info.llm == str(run)
    assert sorted(s.trial for s in loaded.simulations) == [0, 0, 1, 1]
    rewards = [s.reward_info.reward for s in loaded.simulations]
    assert results.reevaluate(loaded, "mock", solo=True) == rewards
    assert report.summary["avg"] == pytest.approx(sum(rewards) / 4)
