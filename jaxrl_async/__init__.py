"""jaxrl_async: asynchronous RL for language-model agents with decomposed off-policy correction."""

__version__ = "0.1.0"
