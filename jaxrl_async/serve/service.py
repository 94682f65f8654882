"""Chat completions end to end: a checked request to prompt ids, the engine, the OpenAI response.

`ChatService.complete(request)` renders the conversation (`chat_format.ChatFormat`), checks
it fits the context, derives each choice's PRNG key from the request's seed, waits for the
engine (`engine.Engine`) and builds the response: the text parsed into content and tool calls,
`finish_reason`, `usage`, the policy version and, when asked (`return_token_ids`), the
token ids and log-probs. `build_service(config, ...)` loads the model, tokenizer and
weights of a run config.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_async.serve.chat_format import ChatFormat
from jaxrl_async.serve.engine import Completion, Engine, QueueFull, uncommitted
from jaxrl_async.serve.episodes import EpisodeRecorder
from jaxrl_async.serve.protocol import MAX_N, APIError, ChatRequest, bad


@jax.jit
def _fold_choices(key_data):
    """[MAX_N, 2] key data: the request key (`key_data` [2]) folded with each choice index."""
    key = jax.random.wrap_key_data(key_data)
    return jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(MAX_N)))


def choice_keys(seed: int, n: int) -> np.ndarray:
    """[n, 2] uint32 key data of a request's choices: the seed (mod 2**64) as threefry key data
    (high word, low word), folded with the choice index."""
    s = int(seed) % 2**64
    return np.asarray(_fold_choices(np.asarray([s >> 32, s & 0xFFFFFFFF], np.uint32)))[:n]


class ChatService:
    """Requests in, OpenAI chat-completion responses out (see the module docstring).

    engine: the `Engine`; chat: the `ChatFormat` of the model's tokenizer; max_len: the
    model's context in tokens; model_name: the id `/v1/models` lists and responses name;
    recorder: the agent proxy's `episodes.EpisodeRecorder` (default: groups of one, kept in memory);
    max_tokens: the generation budget of a request that sets none (0: the rest of the context;
    a client that cannot pass `max_tokens`, such as tau2's user simulator, would otherwise let a
    weak policy decode to the end of the context).
    """

    def __init__(self, engine: Engine, chat: ChatFormat, max_len: int, model_name: str,
                 recorder: Optional[EpisodeRecorder] = None, max_tokens: int = 0):
        self.engine, self.chat, self.max_len, self.model_name = engine, chat, int(max_len), model_name
        self.max_tokens = int(max_tokens)
        self.recorder = recorder or EpisodeRecorder(chat)
        self._rng = np.random.default_rng()

    def prepare(self, req: ChatRequest, episode: Optional[str] = None) -> tuple[list[int], str, int, bool]:
        """(prompt ids, forced call prefix, max_tokens, whether tool calls are parsed) of a request;
        APIError 400 when the template fails or the context cannot hold the request. With
        `episode` (the agent proxy) a later call's prompt extends the episode's tokens."""
        tools = req.tools if req.tool_choice != "none" else None
        try:
            text = self.chat.render(req.messages, tools)
            prefix = ""
            if req.tool_choice == "required":
                prefix = self.chat.call_prefix(tools)
            elif isinstance(req.tool_choice, dict):
                prefix = self.chat.call_prefix(tools, req.tool_choice["name"])
            if episode is None:
                prompt = self.chat.encode(text + prefix)
            else:
                if req.n != 1:
                    raise bad("n", "an episode's call has one choice (n=1)")
                prompt = self.recorder.prompt(episode, req.messages, tools, self.chat.encode(text + prefix), prefix)
        except APIError:
            raise
        except ValueError as e:  # the template rejects the conversation (models.hf.CheckpointError)
            raise bad("messages", f"the chat template cannot render this conversation: {e}") from None
        room = self.max_len - len(prompt)
        if room < 1:
            raise bad("messages", f"the prompt has {len(prompt)} tokens; the model's context is {self.max_len} "
                                  f"and must hold at least one generated token", code="context_length_exceeded")
        if req.max_tokens is not None and req.max_tokens > room:
            raise bad("max_tokens", f"the prompt has {len(prompt)} tokens and max_tokens is {req.max_tokens}: more "
                                    f"than the model's context of {self.max_len}", code="context_length_exceeded")
        return prompt, prefix, req.max_tokens or min(room, self.max_tokens or room), tools is not None

    async def complete(self, req: ChatRequest, episode: Optional[str] = None) -> dict:
        prompt, prefix, max_tokens, with_tools = self.prepare(req, episode)
        seed = req.seed if req.seed is not None else int(self._rng.integers(2**63))
        try:
            future = self.engine.submit(prompt, max_tokens, choice_keys(seed, req.n), req.temperature, req.top_p)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", type="rate_limit_error",
                           code="queue_full") from None
        completions = await asyncio.wrap_future(future)
        if episode is not None:
            self.recorder.record(episode, req.messages, req.tools if with_tools else None, prompt, completions[0])
        return self.response(req, prompt, prefix, with_tools, completions)

    def _choice(self, i: int, c: Completion, req: ChatRequest, prefix: str, with_tools: bool) -> dict:
        ids, logps = list(c.token_ids), list(c.logprobs)
        body = ids[:-1] if c.ended else ids
        text = self.chat.decode(body)
        finish = "stop" if c.ended else "length"
        cut = min((k for k in (text.find(s) for s in req.stop) if k >= 0), default=-1)
        if cut >= 0:  # a stop string: the text ends before it, the tokens at the first one that reaches it
            k = next(k for k in range(1, len(body) + 1) if len(self.chat.decode(body[:k])) > cut)
            ids, logps, text, finish = ids[:k], logps[:k], text[:cut], "stop"
        full = prefix + text
        content, calls = self.chat.parse(full) if with_tools else (full, [])
        message: dict = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [
                {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": name, "arguments": json.dumps(args)}} for name, args in calls]
            finish = "tool_calls"
        choice = {"index": i, "message": message, "finish_reason": finish, "logprobs": None,
                  "policy_version": c.version}
        if req.return_token_ids:
            choice["token_ids"] = ids
            choice["token_logprobs"] = logps
        return choice

    def response(self, req: ChatRequest, prompt: list[int], prefix: str, with_tools: bool,
                 completions: list[Completion]) -> dict:
        choices = [self._choice(i, c, req, prefix, with_tools) for i, c in enumerate(completions)]
        generated = sum(len(c.token_ids) for c in completions)
        versions = [c.version for c in completions if c.version >= 0]
        out = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": generated,
                      "total_tokens": len(prompt) + generated},
            "policy_version": max(versions) if versions else self.engine.version,
        }
        if req.return_token_ids:
            out["prompt_token_ids"] = prompt
        return out

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "jaxrl_async", "max_model_len": self.max_len}]}


def build_service(config, workdir: str = "", handoff: str = "", model_name: str = "", max_slots: int = 32,
                  max_queue: int = 256, warmup: Sequence[int] = (), producer_id: int = 0,
                  max_tokens: int = 0) -> ChatService:
    """The service of a run config: its model (`model.checkpoint`'s weights or a random init from
    `seed`), its chat tokenizer (`task.tokenizer` / the checkpoint's / the shipped one) and its
    inference numerics. With `workdir` the weights are the newest version the training run
    published to its ring buffer (`workdir/versions`), and the engine follows newer ones (from
    the shared-memory slot named `handoff` first, when given). Raises ValueError naming the
    field or path. warmup: prompt lengths to compile every batch size for now (`Engine.warmup`;
    empty: compile on first use). When the run takes its groups from outside (`runtime.mode =
    'process'`, `runtime.num_samplers = 0`), the agent proxy's complete groups of
    `rl.group_size` episodes go into its queue (`runtime.producer.QueueProducer`, keys numbered
    by `producer_id`). max_tokens: the budget of requests that set none (0: the rest of the context)."""
    from jaxrl_async import config as config_lib
    from jaxrl_async.rollout.sampler import Sampler
    from jaxrl_async.runtime import base as runtime_base

    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"--max_tokens must be an integer >= 0 (0: the rest of the context); got {max_tokens!r}")
    config_lib.validate(config)
    if config.task.format != "chat":
        raise ValueError(f"config.task.format must be 'chat' to serve chat completions; got {config.task.format!r}")
    model_config = config_lib.model_config_from(config)
    chat = ChatFormat(config_lib.chat_tokenizer(config))
    weights, version = None, 0
    if workdir:
        from jaxrl_async.runtime.handoff import WeightSlot, WeightSource
        from jaxrl_async.runtime.versions import VersionStore

        graphdef, params = config_lib.model_structure(config, model_config)
        vdir = runtime_base.versions_dir(workdir)
        if not os.path.isdir(vdir):
            raise ValueError(f"--workdir {workdir!r}: no parameter versions ({vdir} is missing); is it a training run?")
        store = VersionStore(vdir, runtime_base.ring_capacity(config), params)
        weights = WeightSource(store, WeightSlot.attach(handoff, params) if handoff else None)
        version = weights.latest_version()
        if version is None:
            raise ValueError(f"--workdir {workdir!r}: the run has published no parameter version yet ({vdir})")
        params = uncommitted(weights.get(version))
    else:
        graphdef, params = config_lib.init_params(config, model_config)
    sampler = Sampler(graphdef, model_config, config_lib.numerics_from(config), temperature=1.0)
    sampler.update_params(params, version)
    engine = Engine(sampler, chat.pad_id, chat.eot_id, max_slots=max_slots, max_queue=max_queue, weights=weights,
                    seed=config.seed)
    if warmup:
        engine.warmup(warmup)
    source = config.model.checkpoint or workdir
    name = model_name or (os.path.basename(os.path.normpath(source)) if source else "") or "jaxrl_async"
    recorder = None
    if workdir and config.runtime.mode == "process" and config.runtime.num_samplers == 0:
        from jaxrl_async.runtime.producer import QueueProducer

        producer = QueueProducer(workdir, config, producer_id)
        recorder = EpisodeRecorder(chat, config.rl.group_size, sink=lambda group, trajs: producer.put(trajs))
        recorder.producer = producer
    return ChatService(engine, chat, model_config.max_len, name, recorder, max_tokens)
