"""The agent tasks as chats with tool calls, in a model family's own chat format.

``ChatEnv`` wraps a token-level task (``search``, ``tooluse`` and their easy forms; see
``base.Env``) and reuses its state machine: a parsed tool call becomes the task's action
(``guess 5``, ``refund 12 34``) and the task's observation becomes a ``tool`` message. The
conversation is rendered with a Hugging Face tokenizer's Jinja chat template
(``jaxrl_async.models.hf.load_tokenizer``)::

    system     task instructions; the task's tools go to the template as JSON schemas (tools=)
    user       the task (``I am user 12. Please refund my hat.``)
    assistant  one tool call in the family's format, ended by the end-of-turn token
    tool       the result (JSON), or {"error": ...} for a malformed call
    assistant  ...

Formats (``format=``, detected from the tokenizer's special tokens when not given):

* ``chatml`` (Qwen2.5 / Qwen3): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
  then ``<|im_end|>``; text around one call block is allowed and ignored.
* ``llama3`` (Llama 3.1 JSON tool calling): the whole turn is one JSON object
  ``{"name": ..., "parameters": {...}}`` (an optional leading ``<|python_tag|>``; the key
  ``arguments`` is accepted too), then ``<|eot_id|>``.

Token-level interface, as a sampler drives ``base.Env``:

* ``reset(seed) -> list[int]``: the prompt (system + user, ``add_generation_prompt=True``);
* ``step(action) -> StepResult``: ``action`` is the agent turn's tokens without the
  end-of-turn token (a trailing ``eot_id`` is dropped); ``observation`` is what follows the
  end-of-turn token: the end of the assistant turn where the template adds something after
  it (``\\n`` for ChatML), the tool message and, unless the episode is done, the next
  generation prompt. Reward and success are the wrapped task's (1.0 on success at the
  final step). ``info``: ``success``, ``latency_s``, ``turn`` (as the task), ``error``
  (``None``, a chat error code of ``CHAT_ERRORS`` or a task error code such as
  ``unknown_user``), ``call`` (the parsed ``(name, arguments)``, valid or not, or ``None``);
* ``eot_id``, ``pad_id``, ``max_turns``, ``max_turn_tokens``, ``max_prompt_tokens``,
  ``max_observation_tokens``, ``max_episode_tokens`` (prompt + every turn at
  ``max_turn_tokens`` + EOT + the longest observation).

Malformed calls (no call, several calls, bad JSON, unknown tool, wrong argument names, a
non-integer argument, a value outside 0..99) get an ``{"error": ...}`` tool message and
cost a turn (the wrapped task takes an empty turn, so its turn budget and latency draws
advance); they never raise.

Exact rendering: ``conversation_text()`` (prompt + each agent text + EOT + observation)
equals ``tokenizer.render_chat_template(messages, tools, add_generation_prompt=not done)``
whenever each agent text renders back to itself from its message: a call written exactly
as the template writes it (what ``call_text`` returns) is stored as a ``tool_calls``
message, any other text as ``content`` (rendered verbatim by ChatML; the Llama-3.1
template ``trim``s content, so there only text without surrounding whitespace). The token
streams are equal (``reset`` + agent tokens + EOT + observations == ``apply_chat_template``
of ``messages``) when in addition the agent tokens are the tokenizer's own encoding of its
text and no pre-token spans a segment boundary: the boundaries are the end-of-turn token
(special) and the end of the generation prompt, which for ChatML is followed by the added
token ``<tool_call>``; for a Llama-3 pre-tokenizer ``\\n\\n`` before ``{`` is one pre-token in
both. (A GPT-2-style regex, ``\\s+(?!\\S)``, splits ``\\n\\n{`` as ``\\n`` ``\\n`` ``{`` in the whole text
but keeps ``\\n\\n`` whole at the end of the prompt: where the BPE merges ``\\n\\n``, the
tokens differ there while the text stays equal.)

``base.expert_episode(env, seed, rng, noise)`` demonstrates a ``ChatEnv`` too (its turns end
with the tokenizer's ``eot_id``): the scripted agent writes ``call_text`` of the task expert's action; with probability
``noise`` it errs: half the time the task's plausible wrong action, half the time a
malformed call (bad JSON, unknown tool, wrong argument name, a number as a string).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import jsonschema
import numpy as np

from jaxrl_async.envs.base import ERROR_MESSAGES, Env, StepResult
from jaxrl_async.envs.tokenizer import MAX_NUMBER, TOKENIZER

FORMATS = ("chatml", "llama3")
EOT_TOKENS = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}

# Chat-level error codes -> the text of the error tool message.
CHAT_ERRORS = {
    "no_call": "no tool call; answer with exactly one tool call",
    "multiple_calls": "one tool call per turn",
    "bad_json": "the tool call is not valid JSON",
    "unknown_tool": "unknown tool",
    "bad_arguments": "wrong argument names",
    "bad_type": "arguments must be integers",
    "bad_value": "bad value",
}

DEFAULT_SYSTEM = "You are an agent that completes tasks with tools. Call exactly one tool per turn."
_NUMBERS = tuple(str(i) for i in range(MAX_NUMBER + 1))


# ---------------------------------------------------------------------------------------
# Task specs: tools, the user message and tool results of a token-level task


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    description: str
    params: tuple[tuple[str, str], ...]  # (name, description); every argument is an integer in 0..MAX_NUMBER

    def schema(self) -> dict:
        """The tool as the model is told it (the template's `tools=`); calls are validated against
        its `parameters`, so the prompt and the env's checks cannot disagree."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": {
                    "type": "object",
                    "properties": {p: {"type": "integer", "minimum": 0, "maximum": MAX_NUMBER, "description": d}
                                   for p, d in self.params},
                    "required": [p for p, _ in self.params],
                    "additionalProperties": False,
                },
            },
        }


# A failed JSON Schema keyword -> the chat error code (the first matching kind of failure wins).
_SCHEMA_ERRORS = (({"required", "additionalProperties"}, "bad_arguments"), ({"type"}, "bad_type"),
                  ({"minimum", "maximum"}, "bad_value"))


def _error_content(words: list[str]) -> str | None:
    if words[:2] == ["error", ":"]:
        return json.dumps({"error": " ".join(words[2:])})
    return None


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How one token-level task reads as a chat.

    ``user_message(prompt_words)``, ``content(observation_words)``: the texts; the shapes
    (lists of slots, each a list of candidate words) enumerate what prompts and
    observations can be, for the token bounds."""

    tools: tuple[Tool, ...]
    user_message: Callable[[list[str]], str]
    content: Callable[[list[str]], str]
    prompt_shape: Callable[[Env], list[list[str]]]
    observation_shapes: Callable[[Env], list[list[list[str]]]]


def _search_user(w):
    return (f"Find the hidden number: a whole number from 0 to {int(w[3]) - 1}. Use the guess tool; "
            "each answer says whether the hidden number is higher or lower than your guess, or correct.")


def _search_content(w):
    return _error_content(w) or json.dumps({"result": " ".join(w)})


SEARCH_SPEC = TaskSpec(
    tools=(Tool("guess", "Guess the hidden number. Answers higher, lower or correct.",
                (("number", "The guess."),)),),
    user_message=_search_user,
    content=_search_content,
    prompt_shape=lambda env: [["find"], ["number"], ["below"], [str(env.n)]],
    observation_shapes=lambda env: [[["higher", "lower", "correct"]]],
)


def _tooluse_user(w):
    return f"I am user {int(w[1])}. Please refund my {w[5]}."


def _tooluse_content(w):
    err = _error_content(w)
    if err is not None:
        return err
    if w[0] == "order":
        return json.dumps({"orders": [{"order_id": int(w[i + 1]), "item": w[i + 2]} for i in range(0, len(w), 3)]})
    if w[0] == "amount":
        return json.dumps({"amount": int(w[1])})
    if w == ["done"]:
        return json.dumps({"status": "refunded"})
    return json.dumps({"result": " ".join(w)})


def _tooluse_obs_shapes(env):
    from jaxrl_async.envs.tooluse import ITEMS

    nums = list(_NUMBERS[: env.max_value])
    listing = []
    for _ in range(env.num_orders):
        listing += [["order"], nums, list(ITEMS)]
    return [listing, [["amount"], nums], [["done"]]]


def _tooluse_prompt_shape(env):
    from jaxrl_async.envs.tooluse import ITEMS

    return [["user"], list(_NUMBERS[: env.max_value]), ["wants"], ["refund"], ["for"], list(ITEMS)]


TOOLUSE_SPEC = TaskSpec(
    tools=(
        Tool("lookup", "List the orders of a user.", (("user_id", "The user's id."),)),
        Tool("amount", "Get the amount of an order.", (("order_id", "The order's id."),)),
        Tool("refund", "Refund an order. This is final: it ends the task.",
             (("order_id", "The order's id."), ("amount", "The amount to refund."))),
    ),
    user_message=_tooluse_user,
    content=_tooluse_content,
    prompt_shape=_tooluse_prompt_shape,
    observation_shapes=_tooluse_obs_shapes,
)


def spec_for(env: Env) -> TaskSpec:
    from jaxrl_async.envs.search import SearchEnv
    from jaxrl_async.envs.tooluse import ToolUseEnv

    if isinstance(env, SearchEnv):
        return SEARCH_SPEC
    if isinstance(env, ToolUseEnv):
        return TOOLUSE_SPEC
    raise ValueError(f"no chat form for task {type(env).__name__}")


# ---------------------------------------------------------------------------------------
# Tool-call parsers: text -> ((name, arguments) or None, error code or None)

_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def _load_call(body: str, arg_keys: Sequence[str]):
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, ValueError):
        return None, "bad_json"
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None, "bad_json"
    key = next((k for k in arg_keys if k in obj), None)
    args = obj.get(key, {}) if key else {}
    if isinstance(args, str):  # OpenAI style: arguments as a JSON string
        try:
            args = json.loads(args)
        except (json.JSONDecodeError, ValueError):
            return None, "bad_json"
    if not isinstance(args, dict) or set(obj) - {"name", *arg_keys}:
        return None, "bad_json"
    return (obj["name"], args), None


def parse_chatml(text: str):
    """One ``<tool_call>...</tool_call>`` block holding ``{"name": ..., "arguments": {...}}``."""
    blocks = _CALL_BLOCK.findall(text)
    if not blocks:
        return None, ("bad_json" if "<tool_call>" in text else "no_call")
    if len(blocks) > 1:
        return None, "multiple_calls"
    return _load_call(blocks[0].strip(), ("arguments",))


def parse_llama3(text: str):
    """The whole turn as ``{"name": ..., "parameters": {...}}`` (``<|python_tag|>`` allowed)."""
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>"):].strip()
    if not body:
        return None, "no_call"
    if not body.startswith("{"):
        return None, "no_call"
    return _load_call(body, ("parameters", "arguments"))


PARSERS = {"chatml": parse_chatml, "llama3": parse_llama3}


def detect_format(tokenizer) -> str:
    if tokenizer.token_to_id("<|im_end|>") is not None:
        return "chatml"
    if tokenizer.token_to_id("<|eot_id|>") is not None:
        return "llama3"
    raise ValueError(f"{getattr(tokenizer, 'path', tokenizer)}: neither <|im_end|> (ChatML) nor <|eot_id|> "
                     "(Llama 3) is a token; pass format=")


def chat_tokens(tokenizer, format: str | None = None, field: str = "format") -> tuple[str, str, int, int]:
    """(format, end-of-turn token, its id, padding id) of a chat tokenizer: the format given or
    detected from its special tokens; padding is the tokenizer's pad token, else end-of-turn.
    ``field`` names the setting in the error for an unknown format."""
    fmt = format or detect_format(tokenizer)
    if fmt not in FORMATS:
        raise ValueError(f"{field} must be one of {FORMATS}, got {fmt!r}")
    eot_token = EOT_TOKENS[fmt]
    eot_id = tokenizer.token_to_id(eot_token)
    if eot_id is None:
        raise ValueError(f"{eot_token} is not a token of the tokenizer")
    pad = getattr(tokenizer, "pad_token_id", None)
    return fmt, eot_token, int(eot_id), int(pad) if pad is not None else int(eot_id)


def _slot_bound(fn: Callable[[list[str]], int], shape: list[list[str]]) -> int:
    """Upper bound of ``fn`` over the words of ``shape``, slot by slot: exact when each
    slot's tokens do not depend on the other slots (numbers and words are separate
    pre-tokens in the formats here)."""
    base = [s[0] for s in shape]
    b = fn(base)
    total = b
    for i, slot in enumerate(shape):
        if len(slot) > 1:
            total += max(fn(base[:i] + [v] + base[i + 1:]) for v in slot) - b
    return total


_BOUNDS_CACHE: dict[tuple, tuple[int, int, int]] = {}


# ---------------------------------------------------------------------------------------
# The chat env


class ChatEnv:
    """A token-level task as a chat with tool calls (see the module docstring)."""

    def __init__(self, env: Env, tokenizer=None, *, format: str | None = None, max_turn_tokens: int = 48,
                 system_prompt: str = DEFAULT_SYSTEM):
        """env: the wrapped task (``make_env(...)``); tokenizer: an ``HFTokenizer`` or a
        directory (default: the shipped ChatML tokenizer)."""
        if tokenizer is None or isinstance(tokenizer, str):
            from jaxrl_async.envs.chat_tokenizer import SHIPPED_TOKENIZER
            from jaxrl_async.models.hf import load_tokenizer

            tokenizer = load_tokenizer(tokenizer or SHIPPED_TOKENIZER)
        self.env = env
        self.tokenizer = tokenizer
        self.format, self.eot_token, self.eot_id, self.pad_id = chat_tokens(tokenizer, format)
        self.parse = PARSERS[self.format]
        self.spec = spec_for(env)
        self.tools = [t.schema() for t in self.spec.tools]
        self._tools_by_name = {t.name: t for t in self.spec.tools}
        self._validators = {t["function"]["name"]: jsonschema.Draft202012Validator(t["function"]["parameters"])
                            for t in self.tools}
        self.system_prompt = system_prompt
        if max_turn_tokens < 1:
            raise ValueError(f"max_turn_tokens must be >= 1, got {max_turn_tokens}")
        self.max_turn_tokens = int(max_turn_tokens)
        self.name = f"chat_{env.name}"
        self.messages: list[dict] = []
        self._texts: list[str] = []
        self._bounds: tuple[int, int, int] | None = None

    # ---- rendering ----------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.render_chat_template(messages, tools=self.tools,
                                                   add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _intro(self, user: str) -> list[dict]:
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]

    def _call_message(self, name: str, arguments: Any) -> dict:
        return {"role": "assistant", "content": None,
                "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}

    def call_text(self, name: str, arguments: Any) -> str:
        """The agent text of one tool call exactly as the chat template writes it (without
        the end-of-turn token)."""
        base = [{"role": "user", "content": "x"}]
        a = self.render(base, True)
        b = self.render(base + [self._call_message(name, arguments)], False)
        if not b.startswith(a) or self.eot_token not in b[len(a):]:
            raise ValueError("the chat template does not render an assistant tool call after its generation prompt")
        rest = b[len(a):]
        return rest[: rest.rindex(self.eot_token)]

    def _observation_text(self, messages: list[dict], done: bool) -> str:
        """What follows the last assistant turn's end-of-turn token: the rest of that turn,
        the tool message (messages[-1]) and the next generation prompt (unless done)."""
        a = self.render(messages[:-1], False)
        b = self.render(messages, not done)
        i = a.rfind(self.eot_token)
        if i < 0 or not b.startswith(a):
            raise ValueError("the chat template is not prefix-stable at a tool message")
        return a[i + len(self.eot_token):] + b[len(a):]

    def conversation_text(self) -> str:
        """Prompt + agent texts + end-of-turn tokens + observations, as the env laid them out."""
        return "".join(self._texts)

    # ---- sizes --------------------------------------------------------------------------
    def _compute_bounds(self) -> tuple[int, int, int]:
        env_fields = tuple(sorted((k, v) for k, v in vars(self.env).items()
                                  if isinstance(v, (int, float, str, bool)) and not k.startswith("_")))
        key = (id(self.tokenizer), getattr(self.tokenizer, "path", None), self.tokenizer.chat_template, self.format,
               self.system_prompt, type(self.env).__name__, env_fields)
        if key in _BOUNDS_CACHE:
            return _BOUNDS_CACHE[key]
        spec = self.spec
        prompt = _slot_bound(
            lambda w: len(self.tokenizer.apply_chat_template(self._intro(spec.user_message(w)), tools=self.tools,
                                                             add_generation_prompt=True)),
            spec.prompt_shape(self.env))
        base = [{"role": "user", "content": "x"}, self._call_message("x", {})]

        def obs_len(content: str) -> int:
            return len(self.encode(self._observation_text(base + [{"role": "tool", "content": content}], False)))

        shapes = spec.observation_shapes(self.env)
        obs = max(_slot_bound(lambda w: obs_len(spec.content(w)), s) for s in shapes)
        errors = [obs_len(json.dumps({"error": m})) for m in CHAT_ERRORS.values()]
        errors += [obs_len(spec.content(m.split())) for m in ERROR_MESSAGES.values()]
        obs = max([obs] + errors)
        call = max(_slot_bound(lambda w, t=t: len(self.encode(self.call_text(t.name, dict(zip(
            (p for p, _ in t.params), (int(x) for x in w)))))), [list(_NUMBERS)] * len(t.params))
                   for t in self.spec.tools)
        _BOUNDS_CACHE[key] = (prompt, obs, call)
        return _BOUNDS_CACHE[key]

    @property
    def bounds(self) -> tuple[int, int, int]:
        """(longest prompt, longest observation, longest well-formed call) in tokens."""
        if self._bounds is None:
            self._bounds = self._compute_bounds()
        return self._bounds

    @property
    def max_prompt_tokens(self) -> int:
        return self.bounds[0]

    @property
    def max_observation_tokens(self) -> int:
        return self.bounds[1]

    @property
    def max_call_tokens(self) -> int:
        """Longest well-formed call (``call_text``) with arguments in 0..99."""
        return self.bounds[2]

    @property
    def max_turns(self) -> int:
        return self.env.max_turns

    @property
    def max_episode_tokens(self) -> int:
        return self.max_prompt_tokens + self.max_turns * (self.max_turn_tokens + 1 + self.max_observation_tokens)

    @property
    def turn(self) -> int:
        return self.env.turn

    @property
    def done(self) -> bool:
        return self.env.done

    @property
    def seed(self) -> int | None:
        return self.env.seed

    # ---- episode ------------------------------------------------------------------------
    def reset(self, seed: int) -> list[int]:
        """Starts the task instance of ``seed``; returns the prompt tokens."""
        words = TOKENIZER.decode(self.env.reset(seed)[1:]).split()
        self.messages = self._intro(self.spec.user_message(words))
        text = self.render(self.messages, True)
        self._texts = [text]
        return self.encode(text)

    def validate(self, call) -> str | None:
        """The chat error code of a parsed call: unknown tool, or the arguments against the tool's
        JSON schema (argument names, then types, then ranges); None if the call is valid."""
        name, args = call
        validator = self._validators.get(name)
        if validator is None:
            return "unknown_tool"
        failed = {e.validator for e in validator.iter_errors(args)}
        for keywords, code in _SCHEMA_ERRORS:
            if failed & keywords:
                return code
        return "bad_arguments" if failed else None

    def step(self, action: Sequence[int]) -> StepResult:
        """One agent turn (tokens without the end-of-turn token); never raises on a malformed turn."""
        if self.env.done:
            raise RuntimeError(f"{self.name}: step() called on a finished episode; call reset()")
        action = [int(t) for t in action]
        if action and action[-1] == self.eot_id:
            action = action[:-1]
        text = self.tokenizer.decode(action)
        call, error = self.parse(text)
        if error is None:
            error = self.validate(call)
        if error is None:
            name, args = call
            tool = self._tools_by_name[name]
            # int(): JSON Schema counts 3.0 as an integer; the task reads the number's word
            words = [name] + [str(int(args[p])) for p, _ in tool.params]
            res = self.env.step(TOKENIZER.encode(" ".join(words)))
            content = self.spec.content(TOKENIZER.decode(res.observation).split())
            error = res.info["error"]
            tool_msg = {"role": "tool", "name": name, "content": content}
        else:
            res = self.env.step([])  # the task takes an empty turn: the malformed call costs a turn
            tool_msg = {"role": "tool", "content": json.dumps({"error": CHAT_ERRORS[error]})}
        if call is not None and self.call_text(*call) == text:
            assistant = self._call_message(*call)
        else:
            assistant = {"role": "assistant", "content": text}
        self.messages += [assistant, tool_msg]
        obs_text = self._observation_text(self.messages, res.done)
        observation = self.encode(obs_text)
        self._texts += [text, self.eot_token, obs_text]
        info = dict(res.info, error=error, call=call)
        return StepResult(observation=observation, reward=res.reward, done=res.done, info=info)

    # ---- scripted agent -----------------------------------------------------------------
    def _task_call(self, action_ids: list[int]):
        words = TOKENIZER.decode(action_ids).split()
        tool = self._tools_by_name[words[0]]
        return tool.name, {p: int(w) for (p, _), w in zip(tool.params, words[1:])}

    def expert_text(self, rng: np.random.Generator, noise: float) -> str:
        """The scripted agent's turn text from the current state (does not change the env)."""
        if rng.random() >= noise:
            return self.call_text(*self._task_call(self.env.expert_action(rng, 0.0)))
        if rng.random() < 0.5:
            return self.call_text(*self._task_call(self.env.expert_action(rng, 1.0)))
        name, args = self._task_call(self.env.expert_action(rng, 0.0))
        kind = int(rng.integers(4))
        if kind == 0:  # bad JSON: the closing brace of the call is missing
            text = self.call_text(name, args)
            i = text.rindex("}")
            return text[:i] + text[i + 1:]
        if kind == 1:  # unknown tool
            return self.call_text(f"get_{name}", args)
        if kind == 2:  # wrong argument name
            first = next(iter(args))
            return self.call_text(name, {("id" if first != "id" else "value"): args[first],
                                         **{k: v for k, v in args.items() if k != first}})
        return self.call_text(name, {k: str(v) for k, v in args.items()})  # a number as a string

    def expert_action(self, rng: np.random.Generator, noise: float) -> list[int]:
        if self.env.done:
            raise RuntimeError(f"{self.name}: expert_action() called on a finished episode")
        return self.encode(self.expert_text(rng, noise))


def make_chat_env(name: str, tokenizer=None, *, format: str | None = None, max_turn_tokens: int = 48,
                  system_prompt: str = DEFAULT_SYSTEM, **env_kwargs) -> ChatEnv:
    """``ChatEnv`` around ``make_env(name, **env_kwargs)`` (default tokenizer: the shipped one)."""
    from jaxrl_async.envs import make_env

    return ChatEnv(make_env(name, **env_kwargs), tokenizer, format=format, max_turn_tokens=max_turn_tokens,
                   system_prompt=system_prompt)
