"""The tau2 agent whose turns come from the sampler.

tau2's `Orchestrator` asks its agent for a message (`generate_next_message`) whenever the
conversation reaches the agent. Here that message is the sampler's turn, parsed and handed
over (`hand_over`) just before the orchestrator is stepped, so tau2's own orchestrator keeps
the turn order, the stop rules and the environment calls. The agents subclass tau2's
`LLMAgent` and `LLMSoloAgent` for their system prompts (`AGENT_INSTRUCTION` + domain policy,
or the solo instruction + policy + ticket), their tools (solo: the agent's, the user's and
`done`) and their stop rules (solo: a `done` call becomes the stop message).
"""

from __future__ import annotations

import functools

from jaxrl_async.tau2 import lib as lib_module


@functools.cache
def agent_classes():
    """(agent, solo agent) classes built on tau2's (created once, after tau2 is imported)."""
    lib = lib_module.load()

    class _Handoff:
        def _init_handoff(self):
            self.pending = None

        def hand_over(self, message) -> None:
            self.pending = message

        def generate_next_message(self, message, state):
            if isinstance(message, lib.message.MultiToolMessage):
                incoming = list(message.tool_messages)
            else:
                incoming = [] if message is None else [message]
            state.messages.extend(incoming)
            if self.pending is None:
                raise RuntimeError("tau2 asked for an agent turn that the sampler has not taken")
            reply, self.pending = self.pending, None
            reply = self._finish(reply)
            state.messages.append(reply)
            return reply, state

        def _finish(self, reply):
            return reply

        def set_seed(self, seed: int) -> None:  # sampling seeds are the sampler's
            pass

    class TokenAgent(_Handoff, lib.LLMAgent):
        def __init__(self, tools, domain_policy):
            lib.LLMAgent.__init__(self, tools=tools, domain_policy=domain_policy)
            self._init_handoff()

    class TokenSoloAgent(_Handoff, lib.LLMSoloAgent):
        def __init__(self, tools, domain_policy, task):
            lib.LLMSoloAgent.__init__(self, tools=tools, domain_policy=domain_policy, task=task)
            self._init_handoff()

        def _finish(self, reply):
            if reply.is_tool_call():  # tau2's solo rule: a `done` call is the stop message
                reply = self._check_if_stop_toolcall(reply)
            return reply

    return TokenAgent, TokenSoloAgent
