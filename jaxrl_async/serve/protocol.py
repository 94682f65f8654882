"""The OpenAI chat-completions request, checked field by field, and the errors the API answers with.

`parse_chat_request(body)` turns a decoded JSON body into a `ChatRequest` or raises
`APIError` (HTTP 400, an OpenAI-style body naming the field: `{"error": {"message", "type",
"param", "code"}}`). Unknown top-level fields are ignored, as OpenAI-compatible servers do
(clients send `user`, `metadata`, `parallel_tool_calls`...). See `jaxrl_async.serve` for
the fields read and the extension fields.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_N = 16
MAX_STOP = 4


class APIError(Exception):
    """An error answered as `{"error": {...}}` with HTTP `status` (the server keeps serving)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: Optional[str] = None) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


@dataclasses.dataclass
class ChatRequest:
    """A checked chat-completions request.

    messages: OpenAI messages (validated shapes; content may be None or text parts).
    tools: the `tools` list (OpenAI function tools) or None. tool_choice: "auto", "none",
    "required" or a function name. temperature >= 0 (0: greedy), top_p in (0, 1],
    max_tokens None (the rest of the context) or >= 1, seed None or an int, n in 1..16,
    stop: up to 4 strings. return_token_ids: add the extension fields (token ids, log-probs).
    """

    model: str
    messages: list
    tools: Optional[list] = None
    tool_choice: str = "auto"
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: Optional[int] = None
    seed: Optional[int] = None
    n: int = 1
    stop: tuple = ()
    return_token_ids: bool = False


def _number(body: dict, field: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(field)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(field, f"must be a number; got {v!r}")
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(field, f"must be in {'(' if lo_open else '['}{lo}, {hi}]; got {v!r}")
    return float(v)


def _int(body: dict, field: str, lo: int, hi: Optional[int] = None) -> Optional[int]:
    v = body.get(field)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(field, f"must be an integer; got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise bad(field, f"must be in [{lo}, {hi if hi is not None else 'inf'}]; got {v}")
    return v


def _check_content(m: dict, where: str, required: bool) -> None:
    c = m.get("content")
    if c is None:
        if required:
            raise bad(f"{where}.content", "is required")
        return
    if isinstance(c, str):
        return
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return
    raise bad(f"{where}.content", "must be a string or a list of text parts ({\"type\": \"text\", \"text\": ...})")


def _check_message(m: Any, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(where, f"must be an object; got {type(m).__name__}")
    role = m.get("role")
    if role not in ROLES:
        raise bad(f"{where}.role", f"must be one of {list(ROLES)}; got {role!r}")
    calls = m.get("tool_calls")
    if role == "assistant":
        _check_content(m, where, required=False)
        if calls is not None:
            if not isinstance(calls, list):
                raise bad(f"{where}.tool_calls", "must be a list")
            for j, c in enumerate(calls):
                cw = f"{where}.tool_calls[{j}]"
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
                    raise bad(f"{cw}.function", "must be an object with a non-empty string `name`")
                if not isinstance(f.get("arguments", "{}"), (str, dict)):
                    raise bad(f"{cw}.function.arguments", "must be a JSON string")
        elif m.get("content") is None:
            raise bad(where, "an assistant message needs content or tool_calls")
    else:
        if calls is not None:
            raise bad(f"{where}.tool_calls", f"only assistant messages have tool_calls (role {role!r})")
        _check_content(m, where, required=True)
    m = dict(m)
    if role == "developer":  # the newer name of the system role
        m["role"] = "system"
    return m


def _check_tools(tools: Any) -> Optional[list]:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad("tools", "must be a list of function tools")
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(f, dict) \
                or not isinstance(f.get("name"), str) or not f["name"]:
            raise bad(f"tools[{i}]",
                      "must be {\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": ...}}")
    return tools or None


def _tool_choice(body: dict, tools: Optional[list]) -> str | dict:
    """"auto" | "none" | "required" | {"name": function name}."""
    tc = body.get("tool_choice")
    if tc is None:
        return "auto"
    if isinstance(tc, str):
        if tc not in ("auto", "none", "required"):
            raise bad("tool_choice", f"must be 'auto', 'none', 'required' or a named function; got {tc!r}")
        if tc == "required" and not tools:
            raise bad("tool_choice", "'required' needs tools")
        return tc
    f = tc.get("function") if isinstance(tc, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("name"), str):
        raise bad("tool_choice", "a named choice is {\"type\": \"function\", \"function\": {\"name\": ...}}")
    names = [t["function"]["name"] for t in tools or []]
    if f["name"] not in names:
        raise bad("tool_choice", f"function {f['name']!r} is not among the tools {names}")
    return {"name": f["name"]}


def parse_chat_request(body: Any) -> ChatRequest:
    """The checked request of a decoded JSON body; APIError (400) naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if body.get("stream"):
        raise bad("stream", "streaming is not supported; send stream=false")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("model", "is required (a string)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list")
    messages = [_check_message(m, i) for i, m in enumerate(messages)]
    tools = _check_tools(body.get("tools"))
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) and s for s in stop):
        stop = tuple(stop)
    else:
        raise bad("stop", f"must be a string or a list of at most {MAX_STOP} non-empty strings")
    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    seed = _int(body, "seed", -(2**63), 2**64 - 1)
    return ChatRequest(
        model=model, messages=messages, tools=tools, tool_choice=_tool_choice(body, tools),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        max_tokens=max_tokens, seed=seed, n=_int(body, "n", 1, MAX_N) or 1, stop=stop,
        return_token_ids=bool(body.get("return_token_ids", False)))
