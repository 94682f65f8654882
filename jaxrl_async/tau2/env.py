"""A τ2-bench task behind the project's token-level env interface (``base.Env``'s protocol).

One episode is one tau2 task (``reset(seed)`` takes task ``seed % len(tasks)`` of the domain's
split) run by tau2's own ``Orchestrator`` with tau2's ``Environment``, the configured user
(``users``) and an agent whose turns are the sampler's (``agent``). Token in, token out::

    reset(seed) -> prompt tokens: the chat template's render of the agent's view so far
        (system = tau2's agent system prompt with the domain policy [solo: + ticket];
        tools = the domain's ``openai_schema``s [solo: + the user's tools and ``done``];
        not solo: tau2's greeting and the user's first message), generation prompt included.
    step(action) -> StepResult: ``action`` = the agent turn's sampled tokens (a trailing
        ``eot_id`` is dropped). Their text is parsed (``chat.parse_turn``) and handed to tau2;
        the orchestrator runs (tool calls through ``Environment``, user turns) until the agent
        is asked again or tau2 ends the episode. ``observation`` = what the template puts after
        the turn's end-of-turn token: the rest of that turn, the messages the agent received
        (tool results, the user's reply) and, unless done, the next generation prompt.

The token stream (prompt + turns + EOT + observations) is the template's render of the agent's
view of the conversation, where each turn is stored as the tool-call message it parsed to when
that renders back to the sampled text, as its text otherwise (see ``envs.chat`` for when the
token ids, not only the text, are equal), for templates that render a message the same
whatever follows it (the ChatML and Llama-3 templates). A template that re-renders earlier
turns (Qwen3 drops their thinking and gives only the last turn an empty think block) gets
the same observations: they are read after the turn's end-of-turn token, and the sampled
turns stay as sampled. Observations are loss-masked by the sampler.

Episodes end as tau2 ends them: user stop, agent stop (solo: the ``done`` call), tau2's
``max_steps`` / ``max_errors``, solo text (``agent_error``); also after ``max_turns`` agent
turns (recorded as tau2's ``max_steps``). The reward is tau2's
``evaluate_simulation(..., EvaluationType.ALL)`` with the task's ``reward_basis`` untouched
(tau2 gives 0 to any ending but user/agent stop). ``info``: ``success`` (reward 1.0),
``termination`` (tau2's reason), ``error`` (a ``chat.MALFORMED`` key or ``None``),
``user_error`` (the user simulator failed: the episode is discarded, reward 0, counted in
``user_errors``; it is no verdict on the agent), ``latency_s`` (wall time in tau2 this step),
``turn``. ``simulation`` holds the finished episode as tau2's ``SimulationRun``. An evaluation
that raises (tau2's evaluator on mock, for an env assertion about an object the agent never
made) scores 0, as ``tau2 run --skip-failed-samples`` does, and is counted in
``evaluator_errors``, its message in ``evaluator_error`` and in the reward info.

Sizes: τ2 observations (tool results, user turns) have no useful bound, so
``max_episode_tokens`` is the ``max_context`` given (set it to ``model.max_len``); the sampler
ends an episode that outgrows the model's context as a failure (reward 0).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import multiprocessing
import threading
import time
import uuid
from collections.abc import Sequence

import numpy as np

from jaxrl_async.envs.base import StepResult
from jaxrl_async.envs.chat import chat_tokens
from jaxrl_async.tau2 import chat
from jaxrl_async.tau2 import lib as lib_module
from jaxrl_async.tau2 import tasks as tasks_lib
from jaxrl_async.tau2.agent import agent_classes
from jaxrl_async.tau2.users import USERS, OpenAIUser, UserFailure, user_classes


class Tau2Env:
    """A τ2 domain as a token-level multi-turn task (see the module docstring)."""

    def __init__(self, tokenizer=None, *, domain: str, split: str = "base", user: str = "scripted",
                 format: str | None = None, max_turns: int = 30, max_turn_tokens: int = 512,
                 max_context: int = 32768, max_steps: int = 100, max_errors: int = 10,
                 user_model: str = "", user_api_base: str = "", user_api_key: str = "EMPTY",
                 user_timeout_s: float = 60.0, user_retries: int = 2, user_deadline_s: float = 600.0,
                 user_temperature: float = 0.0, task_ids: Sequence[str] | None = None, eval_processes: int = 0):
        """tokenizer: an ``HFTokenizer`` or a directory (default: the shipped ChatML one). The
        other arguments are ``task.kwargs`` (``user_*``: the ``openai`` user; ``task_ids``: a
        subset of the split's tasks, in the given order; ``eval_processes``: N > 0 runs tau2's
        evaluator in a pool of N processes shared by the envs of this process, see ``_evaluate``)."""
        if tokenizer is None or isinstance(tokenizer, str):
            from jaxrl_async.envs.chat_tokenizer import SHIPPED_TOKENIZER
            from jaxrl_async.models.hf import load_tokenizer

            tokenizer = load_tokenizer(tokenizer or SHIPPED_TOKENIZER)
        if user not in USERS:
            raise ValueError(f"task.kwargs.user must be one of {USERS}; got {user!r}")
        if isinstance(eval_processes, bool) or not isinstance(eval_processes, int) or eval_processes < 0:
            raise ValueError(f"task.kwargs.eval_processes must be an integer >= 0 (0 = evaluate in this process); "
                             f"got {eval_processes!r}")
        self.eval_processes = eval_processes
        for field, v in (("max_turns", max_turns), ("max_turn_tokens", max_turn_tokens),
                         ("max_context", max_context), ("max_steps", max_steps), ("max_errors", max_errors)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"task.kwargs.{field} must be a positive integer; got {v!r}")
        self.remote = None
        if user == "openai":
            if not user_model:
                raise ValueError("task.kwargs.user_model must name the user simulator's litellm model "
                                 "(e.g. 'openai/Qwen3-32B') with task.kwargs.user='openai'")
            if not user_api_base:
                raise ValueError("task.kwargs.user_api_base must be the user simulator's OpenAI-compatible "
                                 "endpoint (e.g. 'http://localhost:8000/v1') with task.kwargs.user='openai'")
            self.remote = OpenAIUser(user_model, user_api_base, user_api_key, float(user_timeout_s),
                                     int(user_retries), float(user_deadline_s), float(user_temperature))
        self.lib = lib_module.load()
        self.tokenizer = tokenizer
        self.format, self.eot_token, self.eot_id, self.pad_id = chat_tokens(tokenizer, format,
                                                                            field="task.kwargs.format")
        self.domain, self.split, self.user = domain, split, user
        self.solo = user == "solo"
        tasks = tasks_lib.load(domain, split, self.solo)
        if task_ids is not None:
            by_id = {t.id: t for t in tasks}
            missing = [i for i in task_ids if i not in by_id]
            if missing:
                raise ValueError(f"task.kwargs.task_ids: {missing} not in domain {domain!r} split {split!r}")
            tasks = tuple(by_id[i] for i in task_ids)
        self.tasks = tasks
        self.max_turns, self.max_turn_tokens = int(max_turns), int(max_turn_tokens)
        self.max_context, self.max_steps, self.max_errors = int(max_context), int(max_steps), int(max_errors)
        self.name = f"tau2_{domain}"
        self.user_errors = 0
        self.evaluator_errors = 0  # episodes whose evaluation raised (scored 0; `evaluator_error` says why)
        self.evaluator_error = ""
        self._turn = 0
        self._done = True
        self._seed = None
        self.simulation = None
        self._max_prompt = None

    # ---- sizes ------------------------------------------------------------------------
    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt over the tasks (scripted and solo users; the openai user's
        first message is not known in advance, so there the longest system prompt)."""
        if self._max_prompt is None:
            self._max_prompt = max(len(self.encode(self._prompt_text(t))) for t in self.tasks)
        return self._max_prompt

    @property
    def max_observation_tokens(self) -> int:
        return self.max_context

    @property
    def max_episode_tokens(self) -> int:
        return self.max_context

    @property
    def turn(self) -> int:
        return self._turn

    @property
    def done(self) -> bool:
        return self._done

    @property
    def seed(self):
        return self._seed

    # ---- rendering ----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def render(self, messages: list[dict], add_generation_prompt: bool, tools=None) -> str:
        return self.tokenizer.render_chat_template(messages, tools=self.tools if tools is None else tools,
                                                   add_generation_prompt=add_generation_prompt)

    def call_text(self, name: str, arguments, content: str | None = None) -> str:
        """The agent text of one tool call exactly as the chat template writes it (no EOT)."""
        base = [{"role": "user", "content": "x"}]
        a = self.render(base, True, tools=[])
        b = self.render(base + [chat.template_call(name, arguments, content=content)], False, tools=[])
        if not b.startswith(a) or self.eot_token not in b[len(a):]:
            raise ValueError("the chat template does not render an assistant tool call after its generation prompt")
        rest = b[len(a):]
        return rest[: rest.rindex(self.eot_token)]

    def _observation_text(self, before: list[dict], after: list[dict], done: bool) -> str:
        """What the template puts after the agent turn's end-of-turn token (the last one in
        ``render(before)``), once ``after`` (= ``before`` + the messages received) is rendered.

        The turn's end-of-turn token is located by count, not by comparing prefixes: templates
        may render the last assistant message differently from earlier ones (Qwen3 adds an
        empty ``<think>`` block to the last turn only), so ``render(before)`` need not be a
        prefix of ``render(after)``; what precedes the token is the sampler's, never re-rendered."""
        a = self.render(before, False)
        b = self.render(after, not done)
        k = a.count(self.eot_token)
        j = -len(self.eot_token)
        for _ in range(k):
            j = b.find(self.eot_token, j + len(self.eot_token))
            if j < 0:
                raise ValueError("the chat template renders fewer end-of-turn tokens once the turn's results follow")
        return b[j + len(self.eot_token):]

    def conversation_text(self) -> str:
        """Prompt + agent texts + end-of-turn tokens + observations, as laid out."""
        return "".join(self._texts)

    # ---- episode --------------------------------------------------------------------------
    def _build(self, task, seed):
        lib = self.lib
        constructor = lib.registry.get_env_constructor(self.domain)
        environment = constructor(solo_mode=True) if self.solo else constructor()
        try:
            user_tools = environment.get_user_tools()
        except ValueError:
            user_tools = None
        TokenAgent, TokenSoloAgent = agent_classes()
        if self.solo:
            agent = TokenSoloAgent(environment.get_tools() + (user_tools or []), environment.get_policy(), task)
            user = lib.DummyUser(tools=user_tools, instructions=str(task.user_scenario))
        else:
            agent = TokenAgent(environment.get_tools(), environment.get_policy())
            ScriptedUser, RemoteUser = user_classes()
            user = ScriptedUser(user_tools, task) if self.remote is None else RemoteUser(user_tools, task, self.remote)
        orch = lib.Orchestrator(domain=self.domain, agent=agent, user=user, environment=environment, task=task,
                                max_steps=self.max_steps, max_errors=self.max_errors, seed=seed,
                                solo_mode=self.solo)
        return orch, agent

    def _prompt_text(self, task) -> str:
        """The prompt of ``task`` without running the user (scripted opening / solo / system)."""
        _, agent = self._build(task, 0)
        self.tools = [t.openai_schema for t in agent.tools]
        msgs = [{"role": "system", "content": agent.system_prompt}]
        if not self.solo and self.remote is None:
            msgs += [{"role": "assistant", "content": "Hi! How can I help you today?"},
                     {"role": "user", "content": str(task.user_scenario.instructions)}]
        return self.render(msgs, True)

    def reset(self, seed: int) -> list[int]:
        """Starts task ``seed % len(tasks)``; returns the prompt tokens."""
        seed = int(seed)
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self._seed, self._turn, self._done = seed, 0, False
        self.task = self.tasks[seed % len(self.tasks)]
        self.orch, self.agent = self._build(self.task, seed)
        self.tools = [t.openai_schema for t in self.agent.tools]
        self._initialized = False
        self._user_failure = None
        self.simulation = None
        self._start_time = self.lib.get_now()
        self._t0 = time.perf_counter()
        self._gold, self._gold_next = None, 0
        self._shown = None
        self._msgs = [{"role": "system", "content": self.agent.system_prompt}]
        if not self.solo:
            try:
                self.orch.initialize()
                self._initialized = True
                self._advance()
            except UserFailure as e:
                self._user_failure = str(e)
            history = self.orch.agent_state.messages + self._incoming()
            self._msgs += [chat.template_message(self.lib, m) for m in history]
        text = self.render(self._msgs, True)
        self._texts = [text]
        return self.encode(text)

    def _incoming(self) -> list:
        """The message(s) tau2 holds for the agent's next turn, once (tool results, user text)."""
        orch = self.orch
        if not self._initialized or orch.to_role != self.lib.Role.AGENT or orch.message is self._shown:
            return []
        self._shown = orch.message
        if isinstance(orch.message, self.lib.message.MultiToolMessage):
            return list(orch.message.tool_messages)
        return [orch.message]

    def _step_orch(self) -> None:
        """One orchestrator step and tau2's limit checks (as ``Orchestrator.run``)."""
        orch, Role = self.orch, self.lib.Role
        orch.step()
        if orch.done or orch.to_role == Role.ENV:
            return
        T = self.lib.simulation.TerminationReason
        if orch.step_count >= orch.max_steps:
            orch.done, orch.termination_reason = True, T.MAX_STEPS
        elif orch.num_errors >= orch.max_errors:
            orch.done, orch.termination_reason = True, T.TOO_MANY_ERRORS

    def _advance(self) -> None:
        """Runs tau2 until the agent is asked for a turn or the episode ends."""
        while not self.orch.done and self.orch.to_role != self.lib.Role.AGENT:
            self._step_orch()

    def step(self, action: Sequence[int]) -> StepResult:
        """One agent turn (tokens without the end-of-turn token); never raises on a malformed turn."""
        if self._done:
            raise RuntimeError(f"{self.name}: step() called on a finished episode; call reset()")
        t0 = time.perf_counter()
        action = [int(t) for t in action]
        if action and action[-1] == self.eot_id:
            action = action[:-1]
        text = self.tokenizer.decode(action)
        self._turn += 1
        kind, payload = chat.parse_turn(text, self.format)
        if self._gold is not None and self._gold_next < len(self._gold) and text == self._gold[self._gold_next]:
            self._gold_next += 1  # the scripted agent's plan advances on its own turns only
        error = payload if kind == "malformed" else None
        if self._user_failure is None and kind != "malformed":
            message = chat.agent_message(self.lib, kind, payload, self._turn)
            self.agent.hand_over(message)
            try:
                if not self._initialized:  # solo: tau2 asks for the first agent turn in initialize()
                    self.orch.initialize()
                    self._initialized = True
                else:
                    self._step_orch()
                self._advance()
            except UserFailure as e:
                self._user_failure = str(e)
        # The turn as the template would store it: the call message when it renders back to the text.
        assistant = {"role": "assistant", "content": text}
        if kind == "call":
            name, args, content = payload
            if self.call_text(name, args, content) == text:
                assistant = chat.template_call(name, args, f"call_{self._turn}", content)
        received = [chat.template_message(self.lib, m) for m in self._incoming()]
        if kind == "malformed":
            received = [{"role": "tool", "content": chat.MALFORMED[payload]}]
        orch = self.orch
        T = self.lib.simulation.TerminationReason
        if self._user_failure is None and not orch.done and self._turn >= self.max_turns:
            orch.done, orch.termination_reason = True, T.MAX_STEPS
        done = self._user_failure is not None or orch.done
        before = self._msgs + [assistant]
        self._msgs = before + received
        obs_text = self._observation_text(before, self._msgs, done)
        self._texts += [text, self.eot_token, obs_text]
        reward, termination = 0.0, None
        if done:
            self._done = True
            if self._user_failure is not None:
                self.user_errors += 1
                termination = T.USER_ERROR.value
            else:
                reward, termination = self._finish()
        info = {"success": done and reward == 1.0, "latency_s": time.perf_counter() - t0, "error": error,
                "turn": self._turn, "termination": termination, "user_error": self._user_failure is not None}
        return StepResult(observation=self.encode(obs_text), reward=reward, done=done, info=info)

    def abandon(self):
        """Ends an episode the sampler stopped (its context ran out) as tau2's ``max_steps``;
        returns its ``SimulationRun`` (reward 0), or None after a user-simulator failure."""
        if not self._done:
            self._done = True
            if self._user_failure is not None:
                self.user_errors += 1
            else:
                self.orch.done = True
                self.orch.termination_reason = self.lib.simulation.TerminationReason.MAX_STEPS
                self._finish()
        return self.simulation

    def _finish(self) -> tuple[float, str]:
        """tau2's SimulationRun of the finished episode and its reward."""
        lib, orch = self.lib, self.orch
        messages = orch.get_trajectory() if self._initialized else []
        sim = lib.simulation.SimulationRun(
            id=str(uuid.uuid4()), task_id=self.task.id, start_time=self._start_time,
            end_time=lib.get_now(),
            duration=time.perf_counter() - self._t0, termination_reason=orch.termination_reason.value,
            messages=messages, seed=self._seed)
        try:
            sim.reward_info = self._evaluate(sim)
        except Exception as e:  # noqa: BLE001 - tau2's evaluator and the domain's env assertions raise many kinds
            # Scored 0, as `tau2 run --skip-failed-samples` scores it, instead of ending the whole run. Seen on
            # mock: an env assertion on a task the agent never created raises ValueError instead of failing.
            self.evaluator_errors += 1
            self.evaluator_error = f"{type(e).__name__}: {e}"
            sim.reward_info = lib.simulation.RewardInfo(reward=0.0, info={"evaluator_error": self.evaluator_error})
        self.simulation = sim
        return float(sim.reward_info.reward), orch.termination_reason.value

    def _evaluate(self, sim):
        """tau2's ``evaluate_simulation(..., EvaluationType.ALL)`` of ``sim``: here, or with
        ``eval_processes`` in a worker process. A retail or airline evaluation is 0.6-2 s of
        Python (it rebuilds and hashes the database); in a thread it holds the GIL and stalls
        the sampler's host loop, in a worker process the calling env thread only waits. The
        simulation and the task cross as tau2's own JSON (what its results files hold)."""
        lib = self.lib
        if not self.eval_processes:
            return lib.evaluate_simulation(simulation=sim, task=self.task, evaluation_type=lib.EvaluationType.ALL,
                                           solo_mode=self.solo, domain=self.domain)
        future = _eval_pool(self.eval_processes).submit(_evaluate_json, sim.model_dump_json(),
                                                        self.task.model_dump_json(), self.domain, self.solo)
        return lib.simulation.RewardInfo.model_validate_json(future.result())

    # ---- scripted agent -------------------------------------------------------------------
    def expert_action(self, rng: np.random.Generator, noise: float) -> list[int]:
        """The next gold turn (``gold.plan``; the plan advances when a turn equals its next
        text); with probability ``noise`` a malformed call instead (its closing brace dropped)."""
        from jaxrl_async.tau2 import gold

        if self._done:
            raise RuntimeError(f"{self.name}: expert_action() called on a finished episode")
        if self._gold is None:
            self._gold = gold.plan(self, self.task)
        text = self._gold[min(self._gold_next, len(self._gold) - 1)]
        if rng.random() < noise and "}" in text:
            i = text.rindex("}")
            text = text[:i] + text[i + 1:]
        return self.encode(text)


_EVAL_POOLS: dict = {}
_EVAL_POOLS_LOCK = threading.Lock()


def _eval_pool(n: int) -> concurrent.futures.ProcessPoolExecutor:
    """The process pool of `n` evaluator workers (spawned: no forked JAX state), one per size and process."""
    with _EVAL_POOLS_LOCK:
        pool = _EVAL_POOLS.get(n)
        if pool is None:
            pool = concurrent.futures.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))
            _EVAL_POOLS[n] = pool
        return pool


def shutdown_eval_pools() -> None:
    """Stops the evaluator worker processes of every `eval_processes` pool this process started (a
    later evaluation starts a new pool). They otherwise live as long as this process."""
    with _EVAL_POOLS_LOCK:
        pools = list(_EVAL_POOLS.values())
        _EVAL_POOLS.clear()
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


atexit.register(shutdown_eval_pools)


def _evaluate_json(sim_json: str, task_json: str, domain: str, solo: bool) -> str:
    """In an evaluator worker: tau2's evaluation of a simulation and task given as JSON; its RewardInfo as JSON."""
    lib = lib_module.load()
    sim = lib.simulation.SimulationRun.model_validate_json(sim_json)
    task = lib.tasks.Task.model_validate_json(task_json)
    return lib.evaluate_simulation(simulation=sim, task=task, evaluation_type=lib.EvaluationType.ALL,
                                   solo_mode=solo, domain=domain).model_dump_json()
