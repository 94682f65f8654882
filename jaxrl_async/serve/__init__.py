"""An OpenAI-compatible chat-completions server over the project's sampler.

    python -m jaxrl_async.serve --config=CFG [--workdir=DIR | --config.model.checkpoint=DIR] \
        --host=127.0.0.1 --port=8000

Modules: `protocol` (the request, checked; OpenAI-style errors), `chat_format` (messages to
prompt ids with the checkpoint's chat template; tool calls parsed by the family's parser of
`envs.chat`), `engine` (requests batched into `rollout.sampler.Sampler.generate`), `service`
(request to response; `build_service` loads a run config's model), `app` (FastAPI routes,
uvicorn), `episodes` (the agent proxy), `__main__` (the command line). docs/serve.md has the commands and examples.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (no streaming); the agent proxy's
`POST /v1/episodes/{episode}/chat/completions` (or the header `X-Episode-Id`) and
`POST /v1/episodes/{episode}/reward` (`episodes`: calls tied to an episode become one
training trajectory, token in, token out; beside a process-mode run with
`runtime.num_samplers = 0` its groups go into the run's queue: `runtime.producer`).

Request fields read: `model` (any string; the response names the served model), `messages`
(system / developer, user, assistant with optional `tool_calls`, tool; extra keys such as a
tool call's `name` are ignored; `function.arguments` a JSON string), `tools` (function
tools), `tool_choice` ("auto", "none": no tools in the prompt and no parsing, "required" or
`{"type": "function", "function": {"name": ...}}`: the turn starts with the template's own call
prefix), `temperature` (0..2; 0 greedy), `top_p`, `max_tokens` / `max_completion_tokens`
(default: the server's `--max_tokens`, else the rest of the context), `seed`, `n` (1..16), `stop`
(up to 4 strings).

Response: the OpenAI `chat.completion` object. `message.tool_calls[].function.arguments` is
always a JSON string; text that does not parse as well-formed calls is returned as
`content`. `finish_reason`: "tool_calls" (calls parsed), "stop" (end-of-turn token or a stop
string), "length" (`max_tokens` or the context ran out). `usage` counts prompt tokens (with a
forced call prefix) and every choice's generated tokens (the end-of-turn token included).

Extension fields:
* `policy_version` (always; top level and per choice): the parameter version that generated
  the tokens (the ring-buffer version beside a training run; 0 for fixed weights).
* With the request field `return_token_ids: true`: `prompt_token_ids` (top level: the prompt
  as the sampler read it), and per choice `token_ids` (the sampled tokens, the end-of-turn
  token included when sampled) and `token_logprobs` (each token's log-prob under the
  distribution it was drawn from: tempered, nucleus-truncated; the untempered log-prob when
  greedy). Training on them is token in, token out: no text is re-tokenised.

Errors: `{"error": {"message", "type", "param", "code"}}` with 400 (malformed request, the
template rejects the conversation, or `code: "context_length_exceeded"`), 429 (`code:
"queue_full"`) or 500; the server keeps serving.

Seeds: each choice samples with its own key, `fold_in(key(seed), choice)`, and position t
with `fold_in(that, t)` (`rollout.sampler.EpisodeSampling`), so parallel requests give the
same tokens as the same requests one by one. Without `seed` the server draws one.
"""
