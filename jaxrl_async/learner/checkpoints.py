"""Orbax checkpoints of the learner: the full train state plus JSON metadata (evaluations, counters)."""

from __future__ import annotations

import os
from typing import Optional

import orbax.checkpoint as ocp


class Checkpoints:
    """`workdir/checkpoints/<step>`: the train state pytree and a JSON `meta` dict, `keep` of them."""

    def __init__(self, workdir: str, keep: int):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Saves and waits: a checkpoint on disk is complete before training moves on."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, step: int, state_target):
        """(state, meta) of checkpoint `step`, the state restored into the structure of `state_target`."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state_target), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def close(self):
        self.manager.close()
