"""``search``: locate a hidden integer by acting on feedback, over several turns.

Format (n = 16)::

    prompt       <bos> find number below 16
    action       guess K                      (K a number token)
    observation  higher | lower | correct     (the hidden number is higher/lower than K)
                 error : ...                  (malformed turn, see base.ERROR_MESSAGES)

Success when a guess is correct within ``max_turns`` turns (the episode ends at once).
Guesses outside [0, n) answer ``error : bad value``.

Expert: binary search on the interval [lo, hi] still consistent with the feedback so far
(guess ``(lo + hi) // 2``), which needs at most ceil(log2(n + 1)) turns (5 for n = 16).
Noise: a uniformly random guess in [0, n) that ignores the feedback (plausible, usually
wrong). Under a noisy policy episode lengths vary from 1 to ``max_turns`` turns.
"""

from __future__ import annotations

import math

import numpy as np

from jaxrl_async.envs.base import ERROR_MESSAGES, ERROR_TOKENS, Env, parse_call
from jaxrl_async.envs.tokenizer import MAX_NUMBER, Tokenizer


class SearchEnv(Env):
    name = "search"

    def __init__(
        self,
        n: int = 16,
        max_turns: int = 6,
        max_turn_tokens: int = 4,
        latency_mean_s: float = 0.0,
        latency_sigma: float = 1.0,
        sleep: bool = False,
    ):
        super().__init__(
            max_turns=max_turns,
            max_turn_tokens=max_turn_tokens,
            latency_mean_s=latency_mean_s,
            latency_sigma=latency_sigma,
            sleep=sleep,
        )
        if not 2 <= n <= MAX_NUMBER:
            raise ValueError(f"n must be in [2, {MAX_NUMBER}] (numbers need tokens), got {n}")
        self.n = int(n)
        self._target = 0
        self._lo = 0
        self._hi = self.n - 1

    @property
    def turns_needed(self) -> int:
        """Worst-case turns of the noiseless expert (binary search)."""
        return math.ceil(math.log2(self.n + 1))

    @property
    def max_prompt_tokens(self) -> int:
        return 5

    @property
    def max_observation_tokens(self) -> int:
        return max(1, ERROR_TOKENS)

    def _reset(self, rng: np.random.Generator) -> list[int]:
        self._target = int(rng.integers(self.n))
        self._lo, self._hi = 0, self.n - 1
        return [Tokenizer.BOS] + self.tokenizer.encode(f"find number below {self.n}")

    def _step(self, words):
        tool, args, error = parse_call(words, {"guess": 1}, self.tokenizer)
        if error is None and not 0 <= args[0] < self.n:
            error = "out_of_range"
        if error is not None:
            return ERROR_MESSAGES[error], False, False, error
        g = args[0]
        if g == self._target:
            return "correct", True, True, None
        if g < self._target:
            self._lo = max(self._lo, g + 1)
            return "higher", False, False, None
        self._hi = min(self._hi, g - 1)
        return "lower", False, False, None

    def _correct_action(self) -> str:
        return f"guess {(self._lo + self._hi) // 2}"

    def _noisy_action(self, rng: np.random.Generator) -> str:
        return f"guess {int(rng.integers(self.n))}"
