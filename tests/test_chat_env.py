"""The agent tasks as chats with tool calls (`envs.chat`) and the shipped chat tokenizer.

ChatML runs on the shipped tokenizer (jaxrl_async/assets/chat_tokenizer); the Llama-3.1
JSON format on a small BPE trained here with Llama-3 special tokens, the Llama-3
pre-tokenizer and a Llama-3.1-like tool-calling template (as tests/test_hf_tokenizer.py
builds its tokenizers). The comparisons with `transformers.AutoTokenizer` need the
`reference` extra and are skipped without it.
"""

import json
import os

import numpy as np
import pytest

from jaxrl_async.envs import ENV_NAMES
from jaxrl_async.envs import chat_tokenizer as ct
from jaxrl_async.envs.base import expert_episode
from jaxrl_async.envs.chat import (
    CHAT_ERRORS,
    ChatEnv,
    make_chat_env,
    parse_chatml,
    parse_llama3,
)
from jaxrl_async.models import hf

ALL = list(ENV_NAMES)

# A Llama-3.1-like tool-calling template (JSON calls with "parameters", tool results as
# ipython turns, a fixed default date as the real one has).
LLAMA_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You have access to the following functions:\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role == 'assistant' and message.tool_calls is defined %}
        {%- if message.tool_calls|length != 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable and message.content is not string %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""  # noqa: E501  (a Jinja chat template: its long lines are part of the text, kept verbatim)


@pytest.fixture(scope="module")
def chatml():
    return hf.load_tokenizer(ct.SHIPPED_TOKENIZER)


def _save_llama(tok, path):
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA_TEMPLATE,
                   "clean_up_tokenization_spaces": False, "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A Llama-3-like tokenizer trained on chats of the tasks in its own format."""
    root = tmp_path_factory.mktemp("llama_tok")
    boot = hf.load_tokenizer(_save_llama(ct.train_bpe(["x"], ct.LLAMA3_SPECIALS, vocab_size=300,
                                                      pattern=ct.LLAMA3_PATTERN), str(root / "boot")))
    texts = []
    for name in ALL:
        env = make_chat_env(name, boot)
        rng = np.random.default_rng(0)
        for seed in range(8):
            expert_episode(env, seed, rng, 0.5)
            texts.append(env.conversation_text())
    tok = ct.train_bpe(texts, ct.LLAMA3_SPECIALS, vocab_size=1000, pattern=ct.LLAMA3_PATTERN)
    return hf.load_tokenizer(_save_llama(tok, str(root / "tok")))


def _check_episode(env: ChatEnv, ep):
    """The laid-out episode is the chat template's rendering of env.messages, token for token."""
    tok = env.tokenizer
    kwargs = dict(tools=env.tools, add_generation_prompt=not env.done)
    assert env.conversation_text() == tok.render_chat_template(env.messages, **kwargs)
    assert ep.tokens == tok.apply_chat_template(env.messages, **kwargs)
    assert len(ep.tokens) == len(ep.loss_mask) <= env.max_episode_tokens
    # The loss mask covers the agent turns: each masked span ends with the end-of-turn token.
    mask = np.asarray(ep.loss_mask)
    ends = np.flatnonzero(np.diff(np.r_[mask, 0]) == -1)
    assert len(ends) == ep.num_turns
    assert all(ep.tokens[i] == env.eot_id for i in ends)
    assert sum(1 for m in env.messages if m["role"] == "assistant") == ep.num_turns


# ---------------------------------------------------------------------------------------
# ChatML on the shipped tokenizer


@pytest.mark.parametrize("name", ALL)
def test_chatml_round_trip(chatml, name):
    env = make_chat_env(name, chatml)
    assert env.format == "chatml" and env.eot_id == chatml.token_to_id("<|im_end|>")
    rng = np.random.default_rng(1)
    for seed in range(24):
        ep = expert_episode(env, seed, rng, (0.0, 0.5, 1.0)[seed % 3])
        _check_episode(env, ep)


@pytest.mark.parametrize("name", ALL)
def test_expert_succeeds_at_noise_0(chatml, name):
    env = make_chat_env(name, chatml)
    rng = np.random.default_rng(2)
    for seed in range(20):
        ep = expert_episode(env, seed, rng, 0.0)
        assert ep.success and ep.reward == 1.0, seed
        assert all(m.get("tool_calls") for m in env.messages if m["role"] == "assistant")


def _run_infos(env, seeds, rng, noise):
    """The info of every turn, with `expected`: the noiseless scripted agent's call in that state."""
    infos = []
    for seed in seeds:
        env.reset(seed)
        while not env.done:
            expected = env.parse(env.expert_text(np.random.default_rng(0), 0.0))[0]
            action = env.expert_action(rng, noise)
            assert len(action) <= env.max_turn_tokens
            res = env.step(action)
            assert len(res.observation) <= env.max_observation_tokens
            infos.append(dict(res.info, expected=expected))
    return infos


def _task_level_wrong(infos) -> int:
    """Turns whose call was well-formed and valid (no chat error) but not the scripted agent's correct one."""
    return sum(i["error"] not in CHAT_ERRORS and i["call"] != i["expected"] for i in infos)


@pytest.mark.parametrize("name", ["search", "tooluse"])
def test_noise_1_has_malformed_calls(chatml, name):
    env = make_chat_env(name, chatml)
    infos = _run_infos(env, range(40), np.random.default_rng(3), 1.0)
    errors = {i["error"] for i in infos}
    assert {"bad_json", "unknown_tool", "bad_arguments", "bad_type"} <= errors
    assert _task_level_wrong(infos) >= 5  # well-formed but wrong actions too
    assert not any(i["success"] for i in infos if i.get("error") in CHAT_ERRORS)
    # Without noise every call is the correct one: the count above measures wrong actions, not calls.
    clean = _run_infos(env, range(10), np.random.default_rng(3), 0.0)
    assert _task_level_wrong(clean) == 0 and not {i["error"] for i in clean} & set(CHAT_ERRORS)


def _say(env, text):
    return env.step(env.encode(text))


def _tool_error(env):
    return json.loads(env.messages[-1]["content"])["error"]


@pytest.mark.parametrize("fmt", ["chatml", "llama3"])
def test_malformed_calls_cost_a_turn(chatml, llama, fmt):
    tok = chatml if fmt == "chatml" else llama
    env = make_chat_env("search", tok, max_turns=10)
    env.reset(5)
    good = env.call_text("guess", {"number": 3})
    if fmt == "chatml":
        assert good == '<tool_call>\n{"name": "guess", "arguments": {"number": 3}}\n</tool_call>'
        wrap = lambda body: f"<tool_call>\n{body}\n</tool_call>"  # noqa: E731
    else:
        assert good == '{"name": "guess", "parameters": {"number": 3}}'
        wrap = lambda body: body  # noqa: E731
    key = "arguments" if fmt == "chatml" else "parameters"
    cases = [
        (wrap('{"name": "guess", "' + key + '": {"number": 3}'), "bad_json"),
        (wrap('{"name": "find", "' + key + '": {"number": 3}}'), "unknown_tool"),
        (wrap('{"name": "guess", "' + key + '": {"value": 3}}'), "bad_arguments"),
        (wrap('{"name": "guess", "' + key + '": {}}'), "bad_arguments"),
        (wrap('{"name": "guess", "' + key + '": {"number": "3"}}'), "bad_type"),
        (wrap('{"name": "guess", "' + key + '": {"number": 3.5}}'), "bad_type"),
        (wrap('{"name": "guess", "' + key + '": {"number": 150}}'), "bad_value"),
        ("I think the number is 3.", "no_call"),
        ("", "no_call"),
    ]
    for turn, (text, code) in enumerate(cases, 1):
        res = _say(env, text)
        assert res.info["error"] == code, text
        assert _tool_error(env) == CHAT_ERRORS[code]
        assert env.turn == turn and not res.done and res.reward == 0.0
        assert env.messages[-1]["role"] == "tool"
    # Over budget: the last malformed call ends the episode, a failure.
    _check_text(env)
    env2 = make_chat_env("search", tok, max_turns=2)
    env2.reset(5)
    assert not _say(env2, "no").done
    res = _say(env2, wrap("{not json"))
    assert res.done and res.reward == 0.0 and not res.info["success"]
    _check_text(env2)


def _check_text(env):
    assert env.conversation_text() == env.tokenizer.render_chat_template(
        env.messages, tools=env.tools, add_generation_prompt=not env.done)


def test_chatml_step_details(chatml):
    env = make_chat_env("tooluse", chatml)
    prompt = env.reset(0)
    assert chatml.decode(prompt).endswith("<|im_start|>assistant\n")
    assert '"name": "refund"' in chatml.decode(prompt) and "Please refund my" in chatml.decode(prompt)
    user = env.env._user
    # A task-level error passes through as a tool message (and costs a turn).
    res = _say(env, env.call_text("lookup", {"user_id": (user + 1) % 50}))
    assert res.info["error"] == "unknown_user" and _tool_error(env) == "unknown user"
    obs = chatml.decode(res.observation)
    assert obs.startswith("\n<|im_start|>user\n<tool_response>\n") and obs.endswith("<|im_start|>assistant\n")
    # Two calls in one turn; a trailing end-of-turn token is accepted.
    two = env.call_text("lookup", {"user_id": user}) * 2
    assert env.step(env.encode(two) + [env.eot_id]).info["error"] == "multiple_calls"
    # Free text around the call, arguments as a JSON string (OpenAI style).
    res = _say(env, f'Looking up.\n<tool_call>\n{{"name": "lookup", "arguments": "{{\\"user_id\\": {user}}}"}}\n'
                    '</tool_call>')
    assert res.info["error"] is None and res.info["call"] == ("lookup", {"user_id": user})
    assert json.loads(env.messages[-1]["content"])["orders"][0]["item"] in ("hat", "shoe", "book", "lamp", "cup",
                                                                           "sock", "pen", "bag")
    assert env.messages[-2]["content"].startswith("Looking up.")  # non-canonical text is kept verbatim
    _check_text(env)
    assert env.turn == 3


def test_parsers():
    assert parse_chatml('<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>') == (("a", {"x": 1}), None)
    assert parse_chatml('<tool_call>{"name": "a", "arguments": {"x": 1}}') == (None, "bad_json")
    assert parse_chatml('<tool_call>["a"]</tool_call>') == (None, "bad_json")
    assert parse_chatml('<tool_call>{"name": "a", "arguments": {}, "x": 1}</tool_call>') == (None, "bad_json")
    assert parse_chatml("hello") == (None, "no_call")
    assert parse_llama3(' {"name": "a", "parameters": {"x": 1}} ') == (("a", {"x": 1}), None)
    assert parse_llama3('<|python_tag|>{"name": "a", "arguments": {"x": 1}}') == (("a", {"x": 1}), None)
    assert parse_llama3('{"name": "a", "parameters": [1]}') == (None, "bad_json")
    assert parse_llama3('{"name": 3}') == (None, "bad_json")
    assert parse_llama3("The answer is 3") == (None, "no_call")


def test_sizes_bound_episodes(chatml):
    for name in ALL:
        env = make_chat_env(name, chatml)
        assert env.max_call_tokens <= env.max_turn_tokens
        rng = np.random.default_rng(4)
        for seed in range(30):
            assert len(env.reset(seed)) <= env.max_prompt_tokens
        _run_infos(env, range(30), rng, 0.7)
    with pytest.raises(RuntimeError, match="finished episode"):
        env.step([])


# ---------------------------------------------------------------------------------------
# Llama 3.1 JSON tool calls


@pytest.mark.parametrize("name", ALL)
def test_llama3_round_trip(llama, name):
    env = make_chat_env(name, llama)
    assert env.format == "llama3" and env.eot_id == llama.token_to_id("<|eot_id|>")
    rng = np.random.default_rng(5)
    for seed in range(12):
        noise = (0.0, 0.5, 1.0)[seed % 3]
        ep = expert_episode(env, seed, rng, noise)
        _check_episode(env, ep)
        assert ep.tokens[0] == llama.token_to_id("<|begin_of_text|>")
        if noise == 0.0:
            assert ep.success


def test_llama3_observation_layout(llama):
    env = make_chat_env("search", llama)
    env.reset(1)
    res = _say(env, env.call_text("guess", {"number": 0}))
    obs = llama.decode(res.observation)
    assert obs.startswith("<|start_header_id|>ipython<|end_header_id|>\n\n{")
    assert obs.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert env.messages[-2]["tool_calls"][0]["function"] == {"name": "guess", "arguments": {"number": 0}}


# ---------------------------------------------------------------------------------------
# The shipped tokenizer against transformers


def test_shipped_tokenizer_matches_transformers(chatml):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(ct.SHIPPED_TOKENIZER)
    assert ref.eos_token == "<|im_end|>" and ref.pad_token == "<|endoftext|>"
    assert 300 < chatml.vocab_size == len(ref) < 8192
    env = make_chat_env("tooluse", chatml)
    rng = np.random.default_rng(6)
    for seed in range(6):
        expert_episode(env, seed, rng, 0.6)
        for gen in (True, False):
            kwargs = dict(tools=env.tools, add_generation_prompt=gen)
            text = chatml.render_chat_template(env.messages, **kwargs)
            assert text == ref.apply_chat_template(env.messages, tokenize=False, **kwargs)
            ids = list(ref.apply_chat_template(env.messages, tokenize=True, return_dict=False, **kwargs))
            assert chatml.apply_chat_template(env.messages, **kwargs) == ids
            assert chatml.decode(ids) == ref.decode(ids) == text
    for text in ("<tool_call>\n{\"x\": 1}\n</tool_call>", "caf\u00e9 42 \U0001F600", ""):
        assert chatml.encode(text) == ref.encode(text)


def test_tokenizer_build_is_deterministic(tmp_path):
    pytest.importorskip("transformers")
    texts = []
    for name in ("search_easy", "tooluse_easy"):
        env = make_chat_env(name, hf.load_tokenizer(ct.SHIPPED_TOKENIZER))
        rng = np.random.default_rng(0)
        for seed in range(6):
            expert_episode(env, seed, rng, 0.5)
            texts.append(env.conversation_text())
    files = []
    for k in range(2):
        path = ct.save_chatml_tokenizer(texts, str(tmp_path / f"t{k}"), vocab_size=800)
        files.append({f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))})
    assert files[0] == files[1] and "tokenizer.json" in files[0] and "chat_template.jinja" in files[0]


def test_shipped_ids_match_the_word_tokenizer(chatml):
    """The shipped tokenizer puts <|endoftext|>, <|im_start|>, <|im_end|> at the ids of the
    word tokenizer's PAD, BOS, EOT, so code that uses TOKENIZER.PAD / EOT pads and stops
    ChatML episodes correctly."""
    from jaxrl_async.envs import TOKENIZER

    env = make_chat_env("search", chatml)
    assert env.pad_id == chatml.token_to_id("<|endoftext|>") == TOKENIZER.PAD
    assert env.eot_id == TOKENIZER.EOT
    assert env.reset(0)[0] == chatml.token_to_id("<|im_start|>") == TOKENIZER.BOS


@pytest.mark.parametrize("name", ["search", "tooluse"])
def test_tool_schema_and_validation_agree(chatml, name):
    # What the model is told (the tool schema in its prompt) is what the env enforces: every
    # argument value is accepted by the schema exactly when the env's validation accepts it.
    import jsonschema

    env = make_chat_env(name, chatml)
    for tool in env.tools:
        fn, params = tool["function"]["name"], tool["function"]["parameters"]
        for prop in params["properties"].values():
            assert prop["type"] == "integer" and prop["minimum"] == 0 and prop["maximum"] == 99
        names = list(params["properties"])
        for value in (-1, 0, 7, 99, 100, 150, 3.0, 3.5, "3", True, None):
            args = {p: value for p in names}
            told = jsonschema.Draft202012Validator(params).is_valid(args)
            enforced = env.validate((fn, args)) is None
            assert told == enforced, (fn, value)
            if not enforced:
                assert env.validate((fn, args)) == ("bad_value" if isinstance(value, int) and not
                                                    isinstance(value, bool) else "bad_type"), (fn, value)
        assert env.validate((fn, {**{p: 1 for p in names}, "extra": 1})) == "bad_arguments"
        assert env.validate((fn, {})) == ("bad_arguments" if names else None)
