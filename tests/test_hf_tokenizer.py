"""`models.hf.load_tokenizer` against `transformers.AutoTokenizer`, token for token.

A small byte-level BPE is trained with `tokenizers` on a few sentences, with ChatML /
Llama-3 special tokens, saved with `PreTrainedTokenizerFast.save_pretrained` plus a
Qwen-like (ChatML, tool schemas, <tool_call> blocks) or a Llama-3.1-like chat template
(bos_token, strftime_now, raise_exception, tojson(indent=4)). Needs the `reference` extra.
"""

import json
import os

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from jaxrl_async.models import hf  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the weather like in Paris today?",
    "Call the get_weather tool with the city name and unit.",
    "The temperature in Paris is 21 degrees celsius, sunny with light wind.",
    "You are a helpful assistant. Answer briefly and use tools when needed.",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "Numbers 0123456789 and symbols !?.,;:-_()[]{}<>/\\\"' appear too.",
]

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                 "<tool_response>", "</tool_response>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|python_tag|>"]

QWEN_TEMPLATE = """{%- if tools %}
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
            {{- tool_call.arguments | tojson }}
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

LLAMA_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
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

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city (\u00b0C or \u00b0F).",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}]

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "What is the weather like in Paris today?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather",
                                          "arguments": {"city": "Paris", "unit": "celsius"}}}]},
    {"role": "tool", "name": "get_weather", "content": '{"temperature": 21, "sky": "sunny"}'},
    {"role": "assistant", "content": "It is 21 degrees celsius and sunny in Paris."},
    {"role": "user", "content": "Thanks! And tomorrow?"},
]

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, unicode caf\u00e9 \u00fcber \u2603 and emoji \U0001F600!",
    "<|im_start|>user\nhello<|im_end|>\n<tool_call>{\"a\": 1}</tool_call>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "",
]


def _train_bpe(specials):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _qwen_dir(path):
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(QWEN_SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=QWEN_SPECIALS[1:])
    fast.chat_template = QWEN_TEMPLATE
    fast.save_pretrained(path)
    return path


def _llama_dir(path):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(LLAMA_SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    # Llama-3 style: encode() prepends <|begin_of_text|> through the post-processor.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.chat_template = LLAMA_TEMPLATE
    fast.save_pretrained(path)
    # The template inside tokenizer_config.json (older layout) instead of chat_template.jinja.
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja):
        os.remove(jinja)
    cfg_path = os.path.join(path, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = LLAMA_TEMPLATE
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return path


@pytest.fixture(scope="module", params=["qwen", "llama"])
def tokenizer_pair(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(f"tok_{request.param}"))
    (_qwen_dir if request.param == "qwen" else _llama_dir)(path)
    ref = transformers.AutoTokenizer.from_pretrained(path)
    ours = hf.load_tokenizer(path)
    return request.param, ref, ours


def _ref_chat(ref, messages, **kwargs):
    out = ref.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    return list(out)


def test_encode_decode_match(tokenizer_pair):
    name, ref, ours = tokenizer_pair
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    if name == "llama":
        assert ours.encode("hi")[0] == ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_id == ref.eos_token_id


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_tools", [True, False])
def test_chat_template_matches(tokenizer_pair, add_generation_prompt, with_tools):
    name, ref, ours = tokenizer_pair
    tools = TOOLS if with_tools else None
    for messages in (CONVERSATION[1:2], CONVERSATION[:2], CONVERSATION):
        kwargs = dict(tools=tools, add_generation_prompt=add_generation_prompt)
        text = ours.render_chat_template(messages, **kwargs)
        assert text == ref.apply_chat_template(messages, tokenize=False, **kwargs)
        ids = ours.apply_chat_template(messages, **kwargs)
        assert ids == _ref_chat(ref, messages, **kwargs)
        assert ours.decode(ids) == text
    if name == "qwen" and with_tools:
        assert "<tool_call>" in text and '"get_weather"' in text and "<tool_response>" in text


def test_template_error_is_clear(tokenizer_pair):
    name, ref, ours = tokenizer_pair
    if name != "llama":
        pytest.skip("the Llama-like template raises on parallel tool calls")
    bad = [CONVERSATION[1], dict(CONVERSATION[2], tool_calls=CONVERSATION[2]["tool_calls"] * 2)]
    with pytest.raises(Exception, match="single tool-calls"):
        ref.apply_chat_template(bad, tokenize=False)
    with pytest.raises(hf.CheckpointError, match=r"tokenizer_config\.json.*single tool-calls"):
        ours.apply_chat_template(bad)


def test_missing_tokenizer_files(tmp_path):
    path = _qwen_dir(str(tmp_path / "tok"))
    os.remove(os.path.join(path, "tokenizer.json"))
    with pytest.raises(hf.CheckpointError, match=r"tokenizer\.json.*not found"):
        hf.load_tokenizer(path)


def test_missing_chat_template(tmp_path):
    from transformers import PreTrainedTokenizerFast

    path = str(tmp_path / "tok")
    PreTrainedTokenizerFast(tokenizer_object=_train_bpe(QWEN_SPECIALS), eos_token="<|im_end|>").save_pretrained(path)
    ours = hf.load_tokenizer(path)
    assert ours.encode("hello") == transformers.AutoTokenizer.from_pretrained(path).encode("hello")
    with pytest.raises(hf.CheckpointError, match="chat_template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])
