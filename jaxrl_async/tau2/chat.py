"""τ2 conversations in a model family's chat format: agent text -> tau2 message, tau2 message -> template.

The agent's turn is the text of its sampled tokens (without the end-of-turn token). It is read
with the family's tool-call parser of `jaxrl_async.envs.chat` (``chatml``: one
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` block, text before it kept as the
message content; ``llama3``: the whole turn one ``{"name": ..., "parameters": {...}}`` object)
and becomes one of:

* a tool call: a tau2 ``AssistantMessage`` with one ``ToolCall`` (id ``call_<turn>``), which
  tau2's ``Environment`` executes (an unknown tool or bad arguments get tau2's own ``Error: ...``
  tool message and count towards tau2's ``max_errors``);
* text: an ``AssistantMessage`` with content, for the user (in solo mode tau2 ends the
  episode with ``agent_error`` unless it is the stop call);
* malformed: the turn tries a call (a ``<tool_call>`` tag, or for Llama 3 text starting
  with ``{``) that does not parse, or is empty. Nothing reaches tau2; the agent gets a tool
  message ``Error: <why>`` (``MALFORMED``) and the turn counts against the turn budget.

Qwen3 ``<think>`` rule: thinking is part of the agent's tokens and stays in the token stream
as sampled (token in, token out), in every turn, never re-rendered; ``<think>...</think>``
blocks are removed only from the text tau2 sees (the message to the user, the evaluator's
trajectory). The Qwen3 chat template drops the thinking of earlier turns when it re-renders a
conversation (and gives the last turn an empty ``<think>`` block), so the stream equals the
template's render only up to those blocks; the observations are the template's own.
"""

from __future__ import annotations

import re

from jaxrl_async.envs.chat import CHAT_ERRORS, PARSERS

THINK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)

# Why a malformed turn failed -> the text of its error tool message.
MALFORMED = {
    "empty": "Error: empty turn; send a message to the user or make a tool call",
    "multiple_calls": f"Error: {CHAT_ERRORS['multiple_calls']}",
    "bad_json": f"Error: {CHAT_ERRORS['bad_json']}",
}


def visible_text(text: str) -> str:
    """The turn's text without ``<think>...</think>`` blocks (what tau2 sees)."""
    return THINK.sub("", text)


def parse_turn(text: str, fmt: str):
    """Reads one agent turn: ``("call", (name, arguments, content_or_None))``,
    ``("text", content)`` or ``("malformed", code)`` with ``code`` a key of ``MALFORMED``."""
    visible = visible_text(text)
    if not visible.strip():
        return "malformed", "empty"
    if fmt == "chatml":
        tries_call = "<tool_call>" in visible
    else:
        body = visible.strip()
        tries_call = body.startswith("{") or body.startswith("<|python_tag|>")
    if not tries_call:
        return "text", visible
    call, error = PARSERS[fmt](visible)
    if error is not None:
        return "malformed", "bad_json" if error == "no_call" else error
    name, args = call
    content = None
    if fmt == "chatml":
        content = visible[: visible.index("<tool_call>")].strip() or None
    return "call", (name, args, content)


def agent_message(lib, kind: str, payload, turn: int):
    """The tau2 ``AssistantMessage`` of a parsed ``call`` or ``text`` turn."""
    M = lib.message
    if kind == "call":
        name, args, content = payload
        return M.AssistantMessage(role="assistant", content=content,
                                  tool_calls=[M.ToolCall(id=f"call_{turn}", name=name, arguments=args)])
    return M.AssistantMessage(role="assistant", content=payload)


def template_call(name: str, arguments, call_id: str | None = None, content: str | None = None) -> dict:
    """An assistant tool-call message as chat templates take it."""
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id is not None:
        call["id"] = call_id
    return {"role": "assistant", "content": content, "tool_calls": [call]}


def template_message(lib, msg) -> dict:
    """A tau2 message the agent sees (greeting, user text, tool result) as a template dict."""
    M = lib.message
    if isinstance(msg, M.ToolMessage):
        return {"role": "tool", "tool_call_id": msg.id, "content": msg.content or ""}
    if isinstance(msg, M.AssistantMessage) and msg.is_tool_call():
        tc = msg.tool_calls[0]
        return template_call(tc.name, tc.arguments, tc.id, msg.content)
    return {"role": msg.role, "content": msg.content or ""}
