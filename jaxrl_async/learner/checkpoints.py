"""Orbax checkpoints of the learner: the full train state plus JSON metadata (evaluations, counters).

Integrity (docs/design.md section 6.3): after Orbax has finished a save, an integrity
manifest (`integrity.json`: the size and SHA-256 of every file of the checkpoint) is
written into the step directory. `restore_latest` verifies it before restoring, and also
treats any Orbax error while restoring as corruption; a bad checkpoint is reported (a
warning naming the bad file), moved aside to `WORKDIR/checkpoints.corrupt/`, and the next
older one is tried. The parameter-version ring buffer (`runtime.versions`) uses the same
manifest helpers.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

MANIFEST = "integrity.json"
_log = logging.getLogger(__name__)


class CheckpointCorrupt(RuntimeError):
    """Every retained checkpoint failed its integrity check or could not be restored."""


class CheckpointMismatch(ValueError):
    """The newest intact checkpoint holds a train state of other shapes: another config's run."""


def _first_line(e: Exception, limit: int = 300) -> str:
    """An Orbax/TensorStore error in one short line (some carry whole tree dumps)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(directory: str) -> list[str]:
    out = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(directory: str) -> None:
    """Records the size and SHA-256 of every file under `directory` in `directory/integrity.json`
    (written to a temp file and renamed, so the manifest itself is whole or absent)."""
    files = {rel: [os.path.getsize(os.path.join(directory, rel)), _digest(os.path.join(directory, rel))]
             for rel in _files(directory)}
    tmp = os.path.join(directory, f".{MANIFEST}.tmp")
    with open(tmp, "w") as f:
        json.dump({"format": 1, "files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, MANIFEST))


def check_manifest(directory: str, required: bool = True) -> Optional[str]:
    """None if every file recorded in `directory`'s manifest is there with its size and digest;
    otherwise what is wrong, naming the bad file. Without a manifest: a problem if `required`."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        return f"{path} is missing (the save did not finish)" if required else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path} is unreadable: {e}"
    for rel, (size, digest) in sorted(files.items()):
        full = os.path.join(directory, rel)
        # The directory can be renamed away between any two calls (a ring-buffer version
        # evicted while a sampler checks it): every file access may find nothing.
        try:
            actual = os.path.getsize(full)
            if actual != size:
                return f"{full} has {actual} bytes, {size} when it was written (truncated or overwritten)"
            if _digest(full) != digest:
                return f"{full} does not match its SHA-256 recorded when it was written (corrupted)"
        except OSError:
            return f"{full} is missing"
    return None


class Checkpoints:
    """`workdir/checkpoints/<step>`: the train state pytree and a JSON `meta` dict, `keep` of them."""

    def __init__(self, workdir: str, keep: int):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.quarantine = os.path.abspath(os.path.join(workdir, "checkpoints.corrupt"))
        self.keep = keep
        self.manager = self._open()

    def _open(self):
        return ocp.CheckpointManager(self.directory,
                                     options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state, meta: dict) -> None:
        """Saves and waits: a checkpoint on disk is complete (and has its manifest) before training moves on."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()
        write_manifest(self.step_dir(step))

    def verify(self, step: int) -> Optional[str]:
        """None if checkpoint `step` is intact, else what is wrong with it (naming the file).

        A checkpoint without a manifest (written before manifests existed, or the learner died
        between Orbax's final rename and the manifest) is accepted here: Orbax's own rename makes
        the step directory appear complete, and `restore_latest` still catches Orbax's errors."""
        return check_manifest(self.step_dir(step), required=False)

    def shape_mismatch(self, step: int, state_target) -> Optional[str]:
        """None if checkpoint `step` holds arrays of the shapes of `state_target` (or its metadata
        cannot be read: `restore` decides then); else a short description of the difference."""
        try:
            stored = ocp.StandardCheckpointHandler().metadata(epath.Path(self.step_dir(step)) / "state")
        except Exception:  # noqa: BLE001 - unreadable metadata is for the integrity checks to report
            return None
        have = collections.Counter(tuple(getattr(x, "shape", ())) for x in jax.tree.leaves(stored))
        want = collections.Counter(tuple(np.shape(x)) for x in jax.tree.leaves(state_target))
        if have == want:
            return None
        only_have, only_want = sorted(have - want)[:3], sorted(want - have)[:3]
        return (f"{sum(have.values())} arrays where this config's train state has {sum(want.values())}"
                + (f"; shapes such as {only_have}" if only_have else "")
                + (f"; this config's has {only_want}" if only_want else ""))

    def restore(self, step: int, state_target):
        """(state, meta) of checkpoint `step`, the state restored into the structure of `state_target`."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state_target), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_latest(self, state_target, warn: Optional[Callable[[str], None]] = None):
        """(step, state, meta) of the newest intact checkpoint, or None if there is no checkpoint.

        Newer checkpoints that fail verification or restore are reported through `warn` (and the
        `logging` warning of this module), then moved to `checkpoints.corrupt/` so that the
        resumed run can save those steps again. Raises `CheckpointCorrupt` (naming every bad
        file) if checkpoints exist but none is intact; nothing is moved then. Raises
        `CheckpointMismatch` if the newest intact checkpoint holds arrays of other shapes than
        `state_target` (a run of another config): that is no corruption, and nothing is moved."""
        steps = self.all_steps()
        if not steps:
            return None
        bad: list[tuple[int, str]] = []
        for step in reversed(steps):
            problem = self.verify(step)
            if problem is None:
                mismatch = self.shape_mismatch(step, state_target)
                if mismatch is not None:
                    raise CheckpointMismatch(
                        f"the checkpoint at step {step} in {self.directory} was written by a run of another config: "
                        f"it holds {mismatch}.\nRerun with --noresume (resume=False) to start this config afresh "
                        f"in this workdir (its checkpoints are removed), or pass another --workdir.")
                try:
                    state, meta = self.restore(step, state_target)
                except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types
                    problem = f"Orbax could not restore {self.step_dir(step)}: {_first_line(e)}"
            if problem is not None:
                msg = f"checkpoint at step {step} is corrupt and will not be used: {problem}"
                _log.warning(msg)
                if warn is not None:
                    warn(f"warning: {msg}")
                bad.append((step, problem))
                continue
            for b, _ in bad:
                self._set_aside(b)
            if bad:
                self.manager.close()
                self.manager = self._open()
                msg = f"fell back to checkpoint at step {step} (newer corrupt checkpoint(s) at {[b for b, _ in bad]})"
                _log.warning(msg)
                if warn is not None:
                    warn(f"warning: {msg}")
            return step, state, meta
        raise CheckpointCorrupt(
            f"no intact checkpoint in {self.directory}: "
            + "; ".join(f"step {s}: {p}" for s, p in bad)
            + ". Rerun with --noresume (resume=False) to start a fresh run in this workdir, "
              "or point --workdir elsewhere.")

    def _set_aside(self, step: int) -> None:
        os.makedirs(self.quarantine, exist_ok=True)
        dst = os.path.join(self.quarantine, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        shutil.move(self.step_dir(step), dst)

    def close(self):
        self.manager.close()
