"""τ2-bench through tau2's own code (docs/tau2.md).

Modules: ``lib`` (imports tau2), ``tasks`` (domains, splits), ``chat`` (agent text <-> tau2
messages in the family's chat format), ``agent`` (the tau2 agent whose turns are the
sampler's), ``users`` (scripted / solo / openai), ``env`` (``Tau2Env``, the token-level task),
``gold`` (gold trajectories and the self-check), ``results`` (tau2 ``Results`` files and
metrics), ``evaluate`` (avg@K / pass^k of a policy), ``configs`` (the paper's setting), ``cli``
(``python -m jaxrl_async.tau2 check|evaluate``). Importing this package does not import tau2.
"""
