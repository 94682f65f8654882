"""Experiments: sweeps of configs run in subprocesses, and the report (tables and figures) over their results."""
