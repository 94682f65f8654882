"""The user side of a τ2 episode (``task.kwargs.user``).

* ``scripted``: deterministic, no model. It opens with the task's user instructions; each
  later agent text message triggers the next group of the task's gold *user* actions
  (consecutive ``requestor="user"`` actions: the user makes those tool calls one by one, then
  answers ``Done.``); when no group is left it answers tau2's stop token ``###STOP###``.
  For tests, the gold self-check and CPU training.
* ``solo``: tau2's solo mode (telecom and mock): no user; tau2's ``DummyUser``, the solo
  agent prompt with the task's ticket, the user's tools given to the agent.
* ``openai``: tau2's own ``UserSimulator`` (its system prompt, guidelines and role flip),
  generating through litellm at an OpenAI-compatible ``api_base`` (vLLM, SGLang, this
  project's server). litellm's timeout and retries apply to each call; the episode has a
  wall-clock deadline. Any failure raises ``UserFailure``: the env then discards the episode
  (``info['user_error']``) instead of scoring it as the agent's failure.
"""

from __future__ import annotations

import dataclasses
import functools
import time

from jaxrl_async.tau2 import lib as lib_module

USERS = ("scripted", "solo", "openai")
DONE_REPLY = "Done."


class UserFailure(RuntimeError):
    """The user simulator failed (timeout after retries, HTTP error, episode deadline)."""


@dataclasses.dataclass(frozen=True)
class OpenAIUser:
    """Where the ``openai`` user simulator generates: litellm ``model`` (e.g.
    ``openai/Qwen3-32B``) at ``api_base``; ``timeout_s`` and ``retries`` per call;
    ``deadline_s`` for the whole episode's user turns."""

    model: str
    api_base: str
    api_key: str = "EMPTY"
    timeout_s: float = 60.0
    retries: int = 2
    deadline_s: float = 600.0
    temperature: float = 0.0

    def llm_args(self) -> dict:
        return {"api_base": self.api_base, "api_key": self.api_key, "timeout": self.timeout_s,
                "num_retries": self.retries, "temperature": self.temperature}


def user_action_groups(task) -> list[list]:
    """The task's gold user actions, grouped into runs of consecutive user actions."""
    groups, last_user = [], False
    for action in (task.evaluation_criteria.actions or []) if task.evaluation_criteria else []:
        is_user = action.requestor == "user"
        if is_user and not last_user:
            groups.append([])
        if is_user:
            groups[-1].append(action)
        last_user = is_user
    return groups


@functools.cache
def user_classes():
    """(scripted user, openai user) classes built on tau2's ``UserSimulator``."""
    lib = lib_module.load()
    M = lib.message

    class ScriptedUser(lib.UserSimulator):
        def __init__(self, tools, task):
            super().__init__(tools=tools, instructions=str(task.user_scenario))
            self.opening = str(task.user_scenario.instructions)
            self.groups = user_action_groups(task)
            self.queue: list = []
            self.opened = False
            self.calls = 0

        def get_init_state(self, message_history=None):
            from tau2.user.base import UserState

            return UserState(system_messages=[], messages=list(message_history or []))

        def generate_next_message(self, message, state):
            tool_result = isinstance(message, (M.ToolMessage, M.MultiToolMessage))
            if not tool_result and self.opened:
                if self.groups:
                    self.queue = list(self.groups.pop(0))
                else:
                    return M.UserMessage(role="user", content=lib.STOP), state
            if self.queue:
                action = self.queue.pop(0)
                self.calls += 1
                call = M.ToolCall(id=f"user_call_{self.calls}", name=action.name, arguments=action.arguments,
                                  requestor="user")
                return M.UserMessage(role="user", content=None, tool_calls=[call]), state
            if not self.opened:
                self.opened = True
                return M.UserMessage(role="user", content=self.opening), state
            return M.UserMessage(role="user", content=DONE_REPLY), state

        def set_seed(self, seed):
            pass

    class RemoteUser(lib.UserSimulator):
        def __init__(self, tools, task, spec: OpenAIUser):
            super().__init__(tools=tools, instructions=str(task.user_scenario), llm=spec.model,
                             llm_args=spec.llm_args())
            self.deadline = time.monotonic() + spec.deadline_s

        def generate_next_message(self, message, state):
            if time.monotonic() > self.deadline:
                raise UserFailure("the episode's user deadline passed")
            try:
                return super().generate_next_message(message, state)
            except Exception as e:  # litellm timeouts, HTTP and connection errors after its retries
                raise UserFailure(f"{type(e).__name__}: {e}") from e

    return ScriptedUser, RemoteUser

