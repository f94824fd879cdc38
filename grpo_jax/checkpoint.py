"""Training checkpoints with orbax: the trainable state as named items (LoRA and
optimizer state, each its own item, so a reader restores the LoRA alone) plus JSON
metadata (step, data position, run fingerprint).

Orbax writes each step into a temporary directory and renames it into place only
once complete, so a run killed mid-write leaves the previous checkpoint as the
latest complete one; the leftover temporary directory is ignored and cleaned up.
A fingerprint of what the state means (model, LoRA shape) is stored with every
checkpoint, and resuming into a different run refuses with one line instead of
loading mismatched adapters.

Layout of a step directory: `<item>/` per state item and `meta/`. Checkpoints
written before items were separate hold one `state/` item, a dict of the items;
`restore` reads those too.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


META_ITEM = "meta"
LEGACY_STATE_ITEM = "state"  # the one state item of checkpoints before items were separate


class CheckpointMismatch(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any
    meta: dict


class Checkpointer:
    """The checkpoints under `directory/checkpoints`: save (keeping the newest `keep`),
    check, restore.

    read_only: for readers beside a run that may still be training (evaluate,
    export): the directory is neither created nor cleaned of temporary
    directories, one of which may be that run's save in progress.
    """

    def __init__(self, directory: str | Path, *, fingerprint: dict, keep: int = 3,
                 read_only: bool = False):
        if keep <= 0:
            raise ValueError(f"keep must be positive, got {keep}")
        self.directory = Path(directory).absolute() / "checkpoints"
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalised: tuples -> lists
        self.read_only = read_only
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"no checkpoints in {Path(directory)} (no "
                                    f"{self.directory.name}/ directory)")
        # orbax's own read_only option would do too, but logs warnings on every open.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, enable_async_checkpointing=False,
            cleanup_tmp_directories=not read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def require_step(self, step: int) -> None:
        """FileNotFoundError naming the available steps unless `step` is complete here."""
        steps = self.all_steps()
        if step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available steps: "
                f"{', '.join(map(str, steps)) or 'none'}")

    def save(self, step: int, items: dict[str, Any], meta: dict) -> None:
        """Write `items` ({name: pytree of arrays}) and `meta` (JSON) for `step`, atomically."""
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only")
        if META_ITEM in items or LEGACY_STATE_ITEM in items:
            raise ValueError(f"item names {META_ITEM!r} and {LEGACY_STATE_ITEM!r} are reserved")
        meta = {**meta, "step": step, "fingerprint": self.fingerprint}
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        self._manager.save(step, args=ocp.args.Composite(
            **args, **{META_ITEM: ocp.args.JsonSave(meta)}), force=True)
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
                f"{', '.join(diff) or 'fingerprint'})"
                + ("" if self.read_only else "; use another --output-dir"))

    def _read_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(
            **{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]

    def restore_latest(self, abstract_items: dict[str, Any]) -> Restored | None:
        """The newest complete checkpoint's `abstract_items`, or None when there is none."""
        step = self.latest_step()
        return None if step is None else self.restore(step, abstract_items)

    def restore(self, step: int, abstract_items: dict[str, Any]) -> Restored:
        """The items named in `abstract_items` ({name: pytree of arrays or
        ShapeDtypeStructs}) of checkpoint `step`, which must exist and match this
        run's fingerprint; other items are not read."""
        self.check_compatible()
        self.require_step(step)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_items)
        if (self.directory / str(step) / LEGACY_STATE_ITEM).is_dir():
            # One `state` item holding every part: read just the parts asked for.
            out = self._manager.restore(step, args=ocp.args.Composite(**{
                LEGACY_STATE_ITEM: ocp.args.PyTreeRestore(
                    abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                    partial_restore=True),
                META_ITEM: ocp.args.JsonRestore()}))
            return Restored(step, dict(out[LEGACY_STATE_ITEM]), out[META_ITEM])
        args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}
        out = self._manager.restore(step, args=ocp.args.Composite(
            **args, **{META_ITEM: ocp.args.JsonRestore()}))
        return Restored(step, {name: out[name] for name in abstract}, out[META_ITEM])

    def close(self) -> None:
        self._manager.close()
