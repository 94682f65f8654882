"""Runtimes: the parameter-version ring buffer, the spool queue, sampler and old-log-prob scorer processes, the inline and process runtimes."""
