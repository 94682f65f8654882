"""The repository's chat tokenizer: a small byte-level BPE with ChatML special tokens.

``SHIPPED_TOKENIZER`` is the directory ``scripts/make_chat_tokenizer.py`` writes (and the
repository ships): ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja``
as ``transformers.PreTrainedTokenizerFast.save_pretrained`` writes them, readable by
``jaxrl_async.models.hf.load_tokenizer`` and by ``transformers.AutoTokenizer``.

The pieces are here, not in the script, so that tests can build tokenizers the same way
(``train_bpe``, ``save_tokenizer``; the Llama-3.1-like format in the tests uses them with
Llama-3 special tokens and its own template):

* ``CHATML_TEMPLATE``: a Qwen2.5-like ChatML template with tools (JSON schemas in the
  system turn inside ``<tools></tools>``, calls as ``<tool_call>\\n{"name": ..., "arguments":
  ...}\\n</tool_call>``, tool results as ``<tool_response>`` blocks in a ``user`` turn);
* the Qwen2 pre-tokenizer (digits split one by one, so every number is a few tokens);
* ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (end of turn, eos) are special, ids 0,
  1, 2: the ids of the word tokenizer's PAD, BOS, EOT (``envs.tokenizer``);
  ``<tool_call>``, ``</tool_call>``, ``<tool_response>``, ``</tool_response>`` are added
  (not special) tokens, as in Qwen2.5.

Training and saving need the ``tokenizers`` package; saving also ``transformers`` (the
``reference`` extra). Loading the shipped directory needs only ``tokenizers`` + ``jinja2``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

SHIPPED_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                                 "chat_tokenizer")

CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>", "<|eom_id|>", "<|python_tag|>")

# Qwen2 / Llama-3 style pre-tokenizer patterns (applied before the byte-level mapping).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHATML_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501  (a Jinja chat template: its long lines are part of the text, kept verbatim)


def strip_tokens(texts: Iterable[str], tokens: Sequence[str]) -> list[str]:
    """The pieces of ``texts`` between the given (special / added) token strings, so that
    BPE training does not spend merges on them."""
    pattern = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))
    out = []
    for text in texts:
        out.extend(p for p in pattern.split(text) if p)
    return out


def train_bpe(texts: Iterable[str], specials: Sequence[str], added: Sequence[str] = (), vocab_size: int = 4096,
              pattern: str = QWEN2_PATTERN, min_frequency: int = 2):
    """A byte-level BPE (``tokenizers.Tokenizer``) trained on ``texts`` (the special and
    added token strings are cut out of them first). ``specials`` are special added tokens
    (ids 0..), ``added`` ordinary added tokens (after the trained vocabulary).
    Deterministic: the same texts give the same tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(strip_tokens(texts, list(specials) + list(added)), trainer)
    if added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return tok


def save_tokenizer(tok, path: str, chat_template: str, *, eos_token: str, pad_token: str | None = None,
                   bos_token: str | None = None, additional_special_tokens: Sequence[str] = ()) -> str:
    """Saves ``tok`` with ``transformers.PreTrainedTokenizerFast.save_pretrained`` and the
    chat template (``chat_template.jinja``); returns ``path``."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {"eos_token": eos_token}
    if pad_token is not None:
        kwargs["pad_token"] = pad_token
    if bos_token is not None:
        kwargs["bos_token"] = bos_token
    if additional_special_tokens:
        kwargs["additional_special_tokens"] = list(additional_special_tokens)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs)
    fast.chat_template = chat_template
    fast.model_max_length = 4096
    os.makedirs(path, exist_ok=True)
    fast.save_pretrained(path)
    return path


def save_chatml_tokenizer(texts: Iterable[str], path: str, vocab_size: int = 4096) -> str:
    """Trains the ChatML tokenizer on ``texts`` and saves it to ``path``."""
    tok = train_bpe(texts, CHATML_SPECIALS, CHATML_TOOL_TOKENS, vocab_size=vocab_size)
    return save_tokenizer(tok, path, CHATML_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          additional_special_tokens=["<|im_start|>", "<|im_end|>"])
