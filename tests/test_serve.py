"""The OpenAI-compatible server (`jaxrl_async.serve`) through the pinned `openai` client.

One tiny random Qwen3-architecture model over the shipped ChatML tokenizer, served once for
the module on a free port (uvicorn in a thread). The tool-call round trips run per family
(ChatML and a Llama-3.1-like tokenizer built as tests/test_chat_env.py builds it) against a
scripted engine that answers with the family's own call text, so they check rendering and
parsing exactly, whatever a random model would write.
"""

import concurrent.futures
import json
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from jaxrl_async.config import base_config  # noqa: E402
from jaxrl_async.envs import chat_tokenizer as ct  # noqa: E402
from jaxrl_async.envs.chat import make_chat_env  # noqa: E402
from jaxrl_async.models import hf  # noqa: E402
from jaxrl_async.serve.app import start_in_thread  # noqa: E402
from jaxrl_async.serve.chat_format import ChatFormat  # noqa: E402
from jaxrl_async.serve.engine import Completion  # noqa: E402
from jaxrl_async.serve.service import ChatService, build_service  # noqa: E402

MAX_QUEUE = 6
TOOLS = [{"type": "function", "function": {
    "name": "guess", "description": "Guess the hidden number.",
    "parameters": {"type": "object", "properties": {"value": {"type": "integer"}}, "required": ["value"]}}}]
CHAT = [{"role": "system", "content": "Call one tool per turn."}, {"role": "user", "content": "Find my number."}]


def _config():
    c = base_config()
    c.task.name = "search_easy"
    c.task.format = "chat"
    c.model.family = "qwen3"
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.num_kv_heads = 32, 1, 2, 1
    c.model.head_dim, c.model.d_ff, c.model.max_len = 16, 64, 256
    return c


@pytest.fixture(scope="module")
def served():
    service = build_service(_config(), model_name="tiny", max_slots=4, max_queue=MAX_QUEUE)
    server, url = start_in_thread(service)
    client = openai.OpenAI(base_url=url, api_key="dummy_key", max_retries=0, timeout=120)
    yield service, client, url
    server.should_exit = True
    server.thread.join(timeout=10)
    service.engine.close()


def _ask(client, seed, messages=CHAT, **kw):
    return client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, seed=seed,
                                          extra_body={"return_token_ids": True}, **kw)


def test_openai_client_against_the_server(served):
    service, client, _ = served
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = _ask(client, 1, max_tokens=12, n=2)
    extra = r.model_extra
    # The prompt is the checkpoint's chat template with the tools, encoded by its tokenizer.
    tok = service.chat.tokenizer
    assert extra["prompt_token_ids"] == tok.apply_chat_template(CHAT, tools=TOOLS, add_generation_prompt=True)
    assert r.model == "tiny" and r.object == "chat.completion" and len(r.choices) == 2
    assert extra["policy_version"] == 0
    total = 0
    for c in r.choices:
        ids, logps = c.model_extra["token_ids"], c.model_extra["token_logprobs"]
        assert 1 <= len(ids) <= 12 and len(logps) == len(ids) and all(lp <= 0 for lp in logps)
        assert c.finish_reason in ("stop", "length", "tool_calls")
        assert c.finish_reason != "length" or len(ids) == 12
        total += len(ids)
    assert r.usage.prompt_tokens == len(extra["prompt_token_ids"]) and r.usage.completion_tokens == total
    assert r.choices[0].model_extra["token_ids"] != r.choices[1].model_extra["token_ids"]  # own key per choice
    # Greedy decoding ignores the seed; a nucleus of (almost) nothing keeps only the most likely token.
    ids = [x.choices[0].model_extra["token_ids"] for x in (
        _ask(client, 1, max_tokens=6, temperature=0.0), _ask(client, 2, max_tokens=6, temperature=0.0),
        _ask(client, 3, max_tokens=6, temperature=1.0, top_p=1e-6))]
    assert ids[0] == ids[1] == ids[2]
    # A stop string cuts the content; the finish reason is "stop".
    text = client.chat.completions.create(model="tiny", messages=CHAT, tools=TOOLS, seed=5,
                                          max_tokens=16).choices[0].message.content
    assert len(text) > 3
    s = client.chat.completions.create(model="tiny", messages=CHAT, tools=TOOLS, seed=5, max_tokens=16,
                                       stop=["\n", text[2:4]]).choices[0]
    assert s.finish_reason == "stop" and s.message.content == text[:min(text.find(x) for x in ("\n", text[2:4])
                                                                       if x in text)]


def test_parallel_seeded_requests_equal_one_by_one(served):
    service, client, _ = served
    asks = [dict(seed=11, max_tokens=10), dict(seed=12, max_tokens=4, temperature=0.7),
            dict(seed=13, max_tokens=8, n=2, top_p=0.9),
            dict(seed=14, max_tokens=6, messages=CHAT + [{"role": "assistant", "content": "ok"},
                                                          {"role": "user", "content": "again"}])]
    before = service.engine.stats["batches"]
    service.engine.pause()  # all requests wait, then decode in one batch
    try:
        with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
            futures = [pool.submit(_ask, client, **kw) for kw in asks]
            t0 = time.monotonic()
            while service.engine.waiting < len(asks) and time.monotonic() - t0 < 60:
                time.sleep(0.01)
            assert service.engine.waiting == len(asks)
            service.engine.resume()
            together = [f.result() for f in futures]
    finally:
        service.engine.resume()
    batches = service.engine.stats["batches"]
    assert batches == before + 1
    alone = [_ask(client, **kw) for kw in asks]
    assert service.engine.stats["batches"] == batches + len(asks)
    for a, b in zip(together, alone):
        for ca, cb in zip(a.choices, b.choices, strict=True):
            assert ca.model_extra["token_ids"] == cb.model_extra["token_ids"]
            np.testing.assert_allclose(ca.model_extra["token_logprobs"], cb.model_extra["token_logprobs"], atol=1e-5)
            assert ca.message.content == cb.message.content and ca.finish_reason == cb.finish_reason


def _post(url, body, raw=None):
    import httpx

    r = httpx.post(f"{url}/chat/completions", content=raw, json=None if raw is not None else body, timeout=60)
    return r.status_code, r.json()


@pytest.mark.parametrize("body, param, code", [
    (None, None, None),  # not JSON
    ({"model": "tiny"}, "messages", None),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", None),
    ({"model": "tiny", "messages": CHAT, "temperature": 3}, "temperature", None),
    ({"model": "tiny", "messages": CHAT, "tools": TOOLS,
      "tool_choice": {"type": "function", "function": {"name": "x"}}}, "tool_choice", None),
    ({"model": "tiny", "messages": CHAT + [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
     "messages[2].tool_calls[0].function", None),
    ({"model": "tiny", "messages": [{"role": "user", "content": "number " * 400}]}, "messages",
     "context_length_exceeded"),
    ({"model": "tiny", "messages": CHAT, "max_tokens": 10_000}, "max_tokens", "context_length_exceeded"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(served, body, param, code):
    _, client, url = served
    status, err = _post(url, body, raw=b"{not json" if body is None else None)
    assert status == 400, err
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["param"] == param
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["code"] == code
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "number " * 400}])
    assert _ask(client, 0, max_tokens=2).choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_full_queue_answers_429(served):
    service, client, _ = served
    service.engine.pause()
    try:
        with concurrent.futures.ThreadPoolExecutor(MAX_QUEUE) as pool:
            futures = [pool.submit(_ask, client, i, max_tokens=2) for i in range(MAX_QUEUE)]
            t0 = time.monotonic()
            while service.engine.waiting < MAX_QUEUE and time.monotonic() - t0 < 60:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as e:
                _ask(client, 99, max_tokens=2)
            assert e.value.body["code"] == "queue_full"
            service.engine.resume()
            assert all(len(f.result().choices) == 1 for f in futures)
    finally:
        service.engine.resume()
    assert _ask(client, 99, max_tokens=2).usage.completion_tokens >= 1


# ---- tool-call round trips per family, against a scripted engine -----------------------------

class _ScriptedEngine:
    """Answers every request with the next scripted turn (token ids), as the sampler would."""

    version = 7

    def __init__(self, eot_id):
        self.eot_id, self.turns, self.prompts = eot_id, [], []

    def submit(self, prompt, max_tokens, keys, temperature, top_p):
        self.prompts.append(list(prompt))
        f = concurrent.futures.Future()
        ids = self.turns.pop(0)
        f.set_result([Completion(ids, [-0.5] * len(ids), ids[-1] == self.eot_id, self.version)] * len(keys))
        return f


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory):
    from test_chat_env import _save_llama  # the Llama-3.1-like template the chat env is tested on

    from jaxrl_async.envs.base import expert_episode

    root = tmp_path_factory.mktemp("serve_llama_tok")
    boot = hf.load_tokenizer(_save_llama(ct.train_bpe(["x"], ct.LLAMA3_SPECIALS, vocab_size=300,
                                                      pattern=ct.LLAMA3_PATTERN), str(root / "boot")))
    env = make_chat_env("search_easy", boot)
    texts = []
    for seed in range(4):
        expert_episode(env, seed, np.random.default_rng(seed), 0.3)
        texts.append(env.conversation_text())
    return hf.load_tokenizer(_save_llama(ct.train_bpe(texts, ct.LLAMA3_SPECIALS, vocab_size=600,
                                                      pattern=ct.LLAMA3_PATTERN), str(root / "tok")))


@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_tool_call_round_trip(family, request):
    tok = hf.load_tokenizer(ct.SHIPPED_TOKENIZER) if family == "chatml" else request.getfixturevalue("llama_tokenizer")
    fmt = ChatFormat(tok)
    assert fmt.format == family
    env = make_chat_env("search_easy", tok)  # the family's own call text, as the chat env writes it
    call = env.call_text("guess", {"value": 42})
    engine = _ScriptedEngine(fmt.eot_id)
    engine.turns = [fmt.encode(call) + [fmt.eot_id], fmt.encode("I give up.") + [fmt.eot_id],
                    fmt.encode(call[:-3]) + [fmt.eot_id]]
    server, url = start_in_thread(ChatService(engine, fmt, max_len=4096, model_name=family))
    try:
        client = openai.OpenAI(base_url=url, api_key="dummy_key", max_retries=0)
        r = client.chat.completions.create(model=family, messages=CHAT, tools=TOOLS, seed=3)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        (tc,) = c.message.tool_calls
        assert tc.type == "function" and tc.function.name == "guess"
        assert isinstance(tc.function.arguments, str) and json.loads(tc.function.arguments) == {"value": 42}
        assert r.model_extra["policy_version"] == 7
        # The call goes back as tau2 sends it (with the extra `name` key) beside the tool result.
        assistant = {"role": "assistant", "content": None, "tool_calls": [
            {"id": tc.id, "name": "guess", "type": "function",
             "function": {"name": "guess", "arguments": tc.function.arguments}}]}
        history = CHAT + [assistant, {"role": "tool", "tool_call_id": tc.id, "content": '{"result": "higher"}'}]
        r2 = client.chat.completions.create(model=family, messages=history, tools=TOOLS,
                                            extra_body={"return_token_ids": True})
        rendered = CHAT + [{"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "guess", "arguments": {"value": 42}}}]},
            {"role": "tool", "content": '{"result": "higher"}'}]
        assert r2.model_extra["prompt_token_ids"] == tok.apply_chat_template(rendered, tools=TOOLS,
                                                                             add_generation_prompt=True)
        # Text that is not a call is content; a broken call too (never an invalid arguments string).
        assert r2.choices[0].finish_reason == "stop" and r2.choices[0].message.content == "I give up."
        assert r2.choices[0].message.tool_calls is None
        r3 = client.chat.completions.create(model=family, messages=CHAT, tools=TOOLS)
        assert r3.choices[0].message.tool_calls is None and r3.choices[0].message.content == call[:-3]
        # A forced call starts the turn with the template's own call prefix.
        prefix = fmt.call_prefix(TOOLS, "guess")
        assert call.startswith(prefix) and prefix.rstrip().endswith(":")
        assert fmt.call_prefix(TOOLS) == call[:call.index("guess")]
        # A call with an empty name is content too: sent back, it would be a malformed request.
        nameless = call.replace('"guess"', '""')
        assert nameless != call and fmt.parse(nameless) == (nameless, [])
    finally:
        server.should_exit = True
        server.thread.join(timeout=10)


def test_server_max_tokens_is_the_budget_of_requests_without_one():
    from jaxrl_async.serve.protocol import parse_chat_request

    fmt = ChatFormat(hf.load_tokenizer(ct.SHIPPED_TOKENIZER))
    capped = ChatService(_ScriptedEngine(fmt.eot_id), fmt, max_len=4096, model_name="x", max_tokens=16)
    open_ended = ChatService(_ScriptedEngine(fmt.eot_id), fmt, max_len=4096, model_name="x")
    req = parse_chat_request({"model": "x", "messages": CHAT})
    prompt, _, budget, _ = capped.prepare(req)
    assert budget == 16 and open_ended.prepare(req)[2] == 4096 - len(prompt)
    assert capped.prepare(parse_chat_request({"model": "x", "messages": CHAT, "max_tokens": 40}))[2] == 40


def test_follows_the_newest_published_version(served, tmp_path):
    """Beside a training run the engine loads each newly published version before its next
    batch (ring buffer read through `runtime.handoff.WeightSource`) and reports it."""
    import jax

    from jaxrl_async.runtime.handoff import WeightSource
    from jaxrl_async.runtime.versions import VersionStore

    service, client, _ = served
    params0 = service.engine.sampler.inf_params  # fp32 numerics: the inference weights are the learner's
    writer = VersionStore(str(tmp_path / "versions"), 2, params0, writer=True)
    service.engine.weights = WeightSource(VersionStore(str(tmp_path / "versions"), 2, params0))
    try:
        r0 = _ask(client, 21, max_tokens=6)
        writer.publish(1, jax.tree.map(lambda x: x * 1.5, params0))
        r1 = _ask(client, 21, max_tokens=6)
        assert (r0.model_extra["policy_version"], r1.model_extra["policy_version"]) == (0, 1)
        assert r1.choices[0].model_extra["policy_version"] == 1
        assert r0.choices[0].model_extra["token_logprobs"] != r1.choices[0].model_extra["token_logprobs"]
    finally:
        service.engine.weights = None
        service.engine.sampler.update_params(params0, 0)
        writer.close()


def test_agent_proxy_episodes_are_the_calls_tokens(served, tmp_path):
    """Calls tied to an episode (route or header) become one trajectory equal token for token to
    the calls' prompt and generated ids; a complete group goes into the trajectory queue."""
    import httpx

    from jaxrl_async.runtime.spool import Item, TrajectoryQueue
    from jaxrl_async.serve.episodes import EpisodeRecorder

    service, _, url = served
    queue = TrajectoryQueue(str(tmp_path / "queue"), 4, fsync=False)
    old = service.recorder
    service.recorder = EpisodeRecorder(service.chat, group_size=2, sink=lambda name, trajs: queue.put(
        Item(f"proxy-{name}", trajs, min(int(t.versions.max()) for t in trajs))))
    try:
        ep = openai.OpenAI(base_url=f"{url}/episodes/ep1", api_key="dummy_key", max_retries=0)
        r1 = ep.chat.completions.create(model="tiny", messages=CHAT, tools=TOOLS, seed=31, max_tokens=6,
                                        extra_body={"return_token_ids": True})
        p1, t1 = r1.model_extra["prompt_token_ids"], r1.choices[0].model_extra["token_ids"]
        ended = r1.choices[0].finish_reason != "length"
        # The client sends back whatever assistant message it likes: the generated tokens stay.
        history = CHAT + [{"role": "assistant", "content": "(edited by the client)"},
                          {"role": "tool", "tool_call_id": "call_1", "content": '{"result": "higher"}'}]
        r2 = ep.chat.completions.create(model="tiny", messages=history, tools=TOOLS, seed=32, max_tokens=6,
                                        extra_body={"return_token_ids": True})
        p2, t2 = r2.model_extra["prompt_token_ids"], r2.choices[0].model_extra["token_ids"]
        stream1 = p1 + t1 + ([] if ended else [service.chat.eot_id])
        assert p2[:len(stream1)] == stream1  # token in, token out: no re-tokenised text
        full = service.chat.render(history, TOOLS)  # the new messages as the template renders them
        assert full.endswith(service.chat.decode(p2[len(stream1):])) and len(p2) > len(stream1)
        # A call that does not extend the episode is refused; the episode goes on.
        status, err = _post(f"{url}/episodes/ep1", {"model": "tiny", "messages": CHAT[1:], "tools": TOOLS})
        assert status == 400 and err["error"]["param"] == "messages"
        # The second episode of the group, tied by header.
        r3 = httpx.post(f"{url}/chat/completions", headers={"X-Episode-Id": "ep2"}, timeout=60, json={
            "model": "tiny", "messages": CHAT, "tools": TOOLS, "seed": 33, "max_tokens": 4,
            "return_token_ids": True}).json()
        assert httpx.post(f"{url}/episodes/ep1/reward", json={"reward": 1.0, "success": True, "group": "g"}).json()[
            "generated_tokens"] == len(t1) + len(t2)
        assert queue.depth() == 0  # the group is not complete yet
        assert httpx.post(f"{url}/episodes/ep2/reward", json={"reward": 0.0, "group": "g"}).status_code == 200
        assert httpx.post(f"{url}/episodes/ep2/reward", json={"reward": 0.0}).status_code == 404
        (item,) = queue.take(1, timeout=10)
        a, b = item.trajectories
        assert item.key == "proxy-g" and (a.reward, b.reward) == (1.0, 0.0) and a.group_id == b.group_id
        ended2 = r2.choices[0].finish_reason != "length"
        assert a.tokens.tolist() == p2 + t2 + ([] if ended2 else [service.chat.eot_id])
        gen = np.flatnonzero(a.loss_mask)
        assert gen.tolist() == list(range(len(p1), len(p1) + len(t1))) + list(range(len(p2), len(p2) + len(t2)))
        logps = r1.choices[0].model_extra["token_logprobs"] + r2.choices[0].model_extra["token_logprobs"]
        np.testing.assert_array_equal(a.behav_logp[gen], np.float32(logps))
        assert (a.versions[gen] == 0).all() and (a.versions[~a.loss_mask] == -1).all() and a.num_turns == 2
        c3 = r3["choices"][0]
        assert b.tokens.tolist()[:len(r3["prompt_token_ids"]) + len(c3["token_ids"])] == \
            r3["prompt_token_ids"] + c3["token_ids"]
    finally:
        service.recorder = old
