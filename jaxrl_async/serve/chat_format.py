"""OpenAI chat messages to prompt token ids, and generated text back to content and tool calls.

Rendering is the checkpoint's own: the tokenizer's Jinja chat template
(`models.hf.HFTokenizer.render_chat_template`) with the request's `tools`, then the
tokenizer's encoding of that text, exactly as `envs.chat.ChatEnv` builds its prompts.
Tool calls are read back with the family's parser of `envs.chat` (`parse_chatml`,
`parse_llama3`; the family is detected from the tokenizer's special tokens as the chat env
does). What does not parse as a well-formed call is returned as plain content.

OpenAI messages differ from what chat templates read in two ways, both normalised here:
`function.arguments` is a JSON *string* in the API and an object in templates (a string that
is not JSON is passed on as it is), and content may be a list of text parts. Extra keys
(tau2 sends `name` beside a tool call's `id`) are ignored by the templates.

Forced calls (`tool_choice` "required" or a named function): the assistant turn is started
with the template's own call prefix (the text before the function name, or before the
arguments of the named function), found by rendering a call message; the model continues
from there and the prefix is part of the text that is parsed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Optional

from jaxrl_async.envs.chat import _CALL_BLOCK, PARSERS, chat_tokens

_NAME_MARK = "\ue000"  # a private-use character: never part of a real function name


class ChatFormat:
    """The chat format of one tokenizer: prompt ids of a conversation, calls parsed from text.

    tokenizer: an `HFTokenizer` (`models.hf.load_tokenizer`); format: "chatml" or "llama3"
    (default: detected from the tokenizer's special tokens).
    """

    def __init__(self, tokenizer, format: Optional[str] = None):
        self.tokenizer = tokenizer
        self.format, self.eot_token, self.eot_id, self.pad_id = chat_tokens(tokenizer, format)
        self.parser = PARSERS[self.format]

    # ---- rendering ------------------------------------------------------------------------
    def render(self, messages: Sequence[dict], tools: Optional[list] = None) -> str:
        """The conversation (OpenAI messages) as text, ending with the assistant generation prompt."""
        return self.tokenizer.render_chat_template(template_messages(messages), tools=tools or None,
                                                   add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def call_prefix(self, tools: list, name: Optional[str] = None) -> str:
        """The start of an assistant tool-call turn as the template writes it: up to the function
        name (`name` None: "required", any tool) or up to the arguments of `name`."""
        base = [{"role": "user", "content": "x"}]
        a = self.tokenizer.render_chat_template(base, tools=tools, add_generation_prompt=True)
        call = {"role": "assistant", "content": None,
                "tool_calls": [{"type": "function", "function": {"name": name or _NAME_MARK, "arguments": {}}}]}
        b = self.tokenizer.render_chat_template(base + [call], tools=tools, add_generation_prompt=False)
        rest = b[len(a):] if b.startswith(a) else ""
        if name is None:
            i = rest.find(_NAME_MARK)
        else:
            j = rest.find(name)
            i = rest.find("{}", j) if j >= 0 else -1  # the empty arguments object after the name
        if i < 0:
            raise ValueError("the chat template does not write an assistant tool call after its generation prompt")
        return rest[:i]

    # ---- parsing --------------------------------------------------------------------------
    def parse(self, text: str) -> tuple[Optional[str], list[tuple[str, dict]]]:
        """(content, calls) of an assistant turn's text (without the end-of-turn token).

        Every call must parse with the family's parser and name a function (a non-empty name:
        the API's own rule for a call sent back), else the whole text is content and there are
        no calls. ChatML allows several `<tool_call>` blocks in one turn (each parsed
        alone) and text around them (returned as content; None when only whitespace).
        """
        if self.format == "chatml":
            blocks = _CALL_BLOCK.findall(text)
            if not blocks:
                return text, []
            calls = []
            for block in blocks:
                call, error = self.parser(f"<tool_call>{block}</tool_call>")
                if error is not None or not call[0]:
                    return text, []
                calls.append(call)
            rest = _CALL_BLOCK.sub("", text).strip()
            return (rest or None), calls
        call, error = self.parser(text)
        if error is not None or not call[0]:
            return text, []
        return None, [call]


def _content_text(content: Any) -> Any:
    """A message's content as templates read it: a list of text parts joined into one string."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content


def template_messages(messages: Sequence[dict]) -> list[dict]:
    """OpenAI messages (validated by `protocol`) as chat templates read them: arguments as
    objects, content as strings ("" for a missing content, except beside tool calls)."""
    out = []
    for m in messages:
        m = dict(m)
        m["content"] = _content_text(m.get("content"))
        if not m.get("tool_calls"):
            m.pop("tool_calls", None)  # an empty list: templates would see a (malformed) call turn
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                f = c["function"]
                args = f.get("arguments")
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except ValueError:
                        pass  # not JSON: the template gets the string as the client sent it
                calls.append({**{k: v for k, v in c.items() if k != "function"},
                              "type": "function", "function": {"name": f["name"], "arguments": args}})
            m["tool_calls"] = calls
        elif m["content"] is None:
            m["content"] = ""
        out.append(m)
    return out
