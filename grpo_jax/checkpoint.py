"""Training checkpoints with orbax: the trainable state (LoRA, optimizer state, PRNG
key) plus JSON metadata (step, data position, run fingerprint).

Orbax writes each step into a temporary directory and renames it into place only
once complete, so a run killed mid-write leaves the previous checkpoint as the
latest complete one; the leftover temporary directory is ignored and cleaned up.
A fingerprint of what the state means (model, LoRA shape) is stored with every
checkpoint, and resuming into a different run refuses with one line instead of
loading mismatched adapters.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any
    meta: dict


class Checkpointer:
    """Save every `every` steps (and on demand), keep the last `keep`."""

    def __init__(self, directory: str | Path, *, fingerprint: dict, keep: int = 3):
        if keep <= 0:
            raise ValueError(f"keep must be positive, got {keep}")
        self.directory = Path(directory).absolute() / "checkpoints"
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalised: tuples -> lists
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False,
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Write `state` (a pytree of arrays) and `meta` (JSON) for `step`, atomically."""
        meta = {**meta, "step": step, "fingerprint": self.fingerprint}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def check_compatible(self) -> None:
        """Refuse a directory whose checkpoints belong to a different run setup."""
        step = self.latest_step()
        if step is None:
            return
        meta = self._read_meta(step)
        theirs = meta.get("fingerprint")
        if theirs != self.fingerprint:
            diff = sorted(k for k in set(theirs or {}) | set(self.fingerprint)
                          if (theirs or {}).get(k) != self.fingerprint.get(k))
            raise CheckpointMismatch(
                f"{self.directory} holds checkpoints of a different run (differs in: "
                f"{', '.join(diff) or 'fingerprint'}); use another --output-dir")

    def _read_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def restore_latest(self, abstract_state: Any) -> Restored | None:
        """The newest complete checkpoint, restored into `abstract_state`'s structure
        (a pytree of arrays or ShapeDtypeStructs), or None when there is none."""
        self.check_compatible()
        step = self.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_state)
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return Restored(step, out["state"], out["meta"])

    def close(self) -> None:
        self._manager.close()
