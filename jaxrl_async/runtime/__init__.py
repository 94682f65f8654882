"""Runtimes: where the learner's batches come from, and how weights reach the samplers.

- `base`: the `Runtime` protocol, the run's directories, the sampler factory.
- `inline`: sampling in the learner's process on a deterministic schedule.
- `groups`: the asynchronous runtimes' shared core: group keys, the staleness gate, the
  learner's `next_groups` loop over a `GroupSource`.
- `process`, `sampler_process`, `spool`: sampler processes on this host, the crash-safe spool
  queue between them and the learner.
- `ray_runtime`: sampler actors on a Ray cluster and their coordinator actor (the `ray` extra).
- `versions`: the parameter-version ring buffer on disk; `handoff`: the shared-memory weight
  slot that gets a new version to the process runtime's samplers without the disk.
- `scorer`: the old-log-prob scorer process of the dedicated proximal route.
"""
