"""Training checkpoints with orbax: the trainable state as named items (LoRA and
optimizer state, each its own item, so a reader restores the LoRA alone) plus JSON
metadata (step, data position, run fingerprint).

Orbax writes each step into a temporary directory and renames it into place only
once complete, so a run killed mid-write leaves the previous checkpoint as the
latest complete one; the leftover temporary directory is ignored and cleaned up.
A fingerprint of what the state means (model, LoRA shape) is stored with every
checkpoint, and resuming into a different run refuses with one line instead of
loading mismatched adapters.

Each checkpoint's metadata holds a sha256 of every item, computed from the arrays
at save; restore recomputes it from what it read. A checkpoint that cannot be
read or does not verify is damaged: `restore_latest` says so in one line and
falls back to the newest one that verifies, and the trainer moves the damaged one
into damaged_checkpoints/ (evidence, never deleted; no longer among the kept).

Layout of a step directory: `<item>/` per state item and `meta/`. Checkpoints
written before items were separate hold one `state/` item, a dict of the items;
`restore` reads those too.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from grpo_jax import sharding


META_ITEM = "meta"
LEGACY_STATE_ITEM = "state"  # the one state item of checkpoints before items were separate
DAMAGED_DIR = "damaged_checkpoints"

log = logging.getLogger("grpo_jax.checkpoint")


class CheckpointMismatch(ValueError):
    pass


class CheckpointDamaged(ValueError):
    """A checkpoint that cannot be read, or whose arrays do not match their checksums."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint {step} is damaged: {reason}")
        self.step, self.reason = step, reason


def item_checksums(items: dict[str, Any]) -> dict[str, str]:
    """{item name: sha256 over its leaves' paths, dtypes, shapes and bytes}: computed
    from the arrays (not the files), so it says whether what a restore returns is
    what was saved, whatever the storage format did in between."""
    out = {}
    for name, tree in items.items():
        digest = hashlib.sha256()
        # Gathered whole (arrays sharded over other hosts too: every process calls this).
        for path, leaf in jax.tree_util.tree_flatten_with_path(sharding.to_host(tree))[0]:
            array = np.ascontiguousarray(leaf)
            digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|"
                          .encode())
            digest.update(array.tobytes())
        out[name] = digest.hexdigest()
    return out


def _first_line(e: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message`, cut to `limit` characters (storage errors
    quote whole paths and driver stacks)."""
    text = str(e).strip()
    line = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
    return line if len(line) <= limit else line[:limit - 1] + "…"


class AllCheckpointsDamaged(ValueError):
    pass


def _is_closed_loop_callback(unraisable) -> bool:
    """A read that fails part-way leaves the storage library's other reads to finish
    later on an event loop already closed; their "Event loop is closed" would print a
    traceback at exit after the one-line report."""
    e = unraisable.exc_value
    return isinstance(e, RuntimeError) and str(e) == "Event loop is closed"


def _is_orphaned_read(record: logging.LogRecord) -> bool:
    """asyncio's "Task exception was never retrieved" for the sibling reads of a
    failed restore (reported once, as CheckpointDamaged)."""
    message = record.getMessage()
    return message.startswith("Task exception was never retrieved") and \
        "async_deserialize" in message


def _not_orphaned_read(record: logging.LogRecord) -> bool:
    return not _is_orphaned_read(record)


def quiet_failed_read_aftermath() -> None:
    """Install the two filters above (a CLI's start-up; idempotent): a damaged
    checkpoint is reported once, in one line, not followed by tracebacks at exit."""
    previous = sys.unraisablehook
    if not getattr(previous, "_drops_closed_loop_callbacks", False):
        def hook(unraisable):  # everything else goes through
            if not _is_closed_loop_callback(unraisable):
                previous(unraisable)
        hook._drops_closed_loop_callbacks = True
        sys.unraisablehook = hook
    asyncio_log = logging.getLogger("asyncio")
    if _not_orphaned_read not in asyncio_log.filters:
        asyncio_log.addFilter(_not_orphaned_read)


# How long a failed read waits for its sibling reads before cancelling them.
_SETTLE_TIMEOUT_S = 120.0


def _settle(loop: asyncio.AbstractEventLoop) -> None:
    """Let the tasks still pending on `loop` finish (their results and exceptions
    retrieved), then its default executor's threads: what must happen before it closes."""
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if pending:
        async def finish():
            try:
                await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True),
                                       _SETTLE_TIMEOUT_S)
            except asyncio.TimeoutError:  # gather cancelled them and waited for that
                pass
        loop.run_until_complete(finish())
    loop.run_until_complete(loop.shutdown_default_executor())


class _SettlingPolicy(asyncio.AbstractEventLoopPolicy):
    """The event loop policy in place, except that its new loops settle before they
    close (see `_reads_settle`); everything else is the policy's own."""

    def __init__(self, base: asyncio.AbstractEventLoopPolicy):
        self.base = base

    def get_event_loop(self):
        return self.base.get_event_loop()

    def set_event_loop(self, loop):
        self.base.set_event_loop(loop)

    def new_event_loop(self):
        loop = self.base.new_event_loop()
        close = loop.close

        def settle_then_close():
            try:
                if not loop.is_closed() and not loop.is_running():
                    _settle(loop)
            finally:
                close()
        try:
            loop.close = settle_then_close
        except AttributeError:  # a loop type that takes no attributes (uvloop): as it is
            pass
        return loop

    def get_child_watcher(self):  # Unix policies (deprecated in 3.12)
        return self.base.get_child_watcher()

    def set_child_watcher(self, watcher):
        self.base.set_child_watcher(watcher)


@contextlib.contextmanager
def _reads_settle():
    """While orbax reads: no storage read outlives the restore that started it.

    Orbax runs each read in a fresh event loop that it closes as soon as the restore
    returns or raises. When one array fails to read (a damaged checkpoint), the
    restore raises at once while TensorStore still reads the item's other arrays; each
    of those later completes into a closed loop ("Event loop is closed") or leaves a
    task or future whose exception nobody retrieves, and the interpreter reports them
    on stderr whenever they complete or are collected: after the one-line report, or
    at exit. Here those loops wait for their pending reads, and the executor threads
    behind them, before closing, so a failed restore is over when it raises."""
    base = asyncio.get_event_loop_policy()
    if isinstance(base, _SettlingPolicy):  # nested
        yield
        return
    asyncio.set_event_loop_policy(_SettlingPolicy(base))
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(base)


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any
    meta: dict
    # Newer checkpoints that were skipped as damaged, newest first.
    skipped: tuple[CheckpointDamaged, ...] = ()


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
        meta = {**meta, "step": step, "fingerprint": self.fingerprint,
                "checksums": item_checksums(items)}
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        try:
            self._manager.save(step, args=ocp.args.Composite(
                **args, **{META_ITEM: ocp.args.JsonSave(meta)}), force=True)
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - a full disk or a refused write, in one line
            # Orbax wrote into a temporary directory: the previous checkpoints are intact.
            raise OSError(f"saving checkpoint {step} in {self.directory} failed "
                          f"({_first_line(e)}); the earlier checkpoints are intact") from e

    def check_compatible(self) -> None:
        """Refuse a directory whose checkpoints belong to a different run setup (as the
        newest checkpoint whose metadata reads says; damaged ones are left to restore)."""
        for step in reversed(self.all_steps()):
            try:
                meta = self._read_meta(step)
            except Exception:  # noqa: BLE001 - a damaged checkpoint; restore reports it
                continue
            theirs = meta.get("fingerprint")
            if theirs != self.fingerprint:
                diff = sorted(k for k in set(theirs or {}) | set(self.fingerprint)
                              if (theirs or {}).get(k) != self.fingerprint.get(k))
                raise CheckpointMismatch(
                    f"{self.directory} holds checkpoints of a different run (differs in: "
                    f"{', '.join(diff) or 'fingerprint'})"
                    + ("" if self.read_only else "; use another --output-dir"))
            return

    def _read_meta(self, step: int) -> dict:
        return self._read(step, **{META_ITEM: ocp.args.JsonRestore()})[META_ITEM]

    def _read(self, step: int, **items) -> Any:
        """orbax's restore of `items` of `step`, over only once all its reads are."""
        with _reads_settle():
            return self._manager.restore(step, args=ocp.args.Composite(**items))

    def restore_latest(self, abstract_items: dict[str, Any] | Callable[[int], dict[str, Any]]
                       ) -> Restored | None:
        """The newest checkpoint that restores and verifies, or None when there is
        none at all. Damaged newer ones are logged, one line each, and listed in
        `Restored.skipped`; when every checkpoint is damaged, AllCheckpointsDamaged.
        `abstract_items` may be a function of the step (runs whose phases save
        different items)."""
        skipped: list[CheckpointDamaged] = []
        for step in reversed(self.all_steps()):
            try:
                restored = self.restore(step, abstract_items(step) if callable(abstract_items)
                                        else abstract_items)
            except CheckpointDamaged as e:
                log.warning("%s in %s; skipped", e, self.directory)
                skipped.append(e)
                continue
            return dataclasses.replace(restored, skipped=tuple(skipped))
        if skipped:
            raise AllCheckpointsDamaged(
                f"every checkpoint in {self.directory} is damaged (none deleted): "
                + "; ".join(f"{e.step}: {e.reason}" for e in skipped))
        return None

    def restore(self, step: int, abstract_items: dict[str, Any]) -> Restored:
        """The items named in `abstract_items` ({name: pytree of arrays or
        ShapeDtypeStructs}) of checkpoint `step`, which must exist and match this
        run's fingerprint; other items are not read. CheckpointDamaged when it cannot
        be read or its arrays do not match the checksums saved with them."""
        self.check_compatible()
        self.require_step(step)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_items)
        try:
            if (self.directory / str(step) / LEGACY_STATE_ITEM).is_dir():
                # One `state` item holding every part: read just the parts asked for.
                out = self._read(step, **{
                    LEGACY_STATE_ITEM: ocp.args.PyTreeRestore(
                        abstract, partial_restore=True,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
                    META_ITEM: ocp.args.JsonRestore()})
                state, meta = dict(out[LEGACY_STATE_ITEM]), out[META_ITEM]
            else:
                args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}
                out = self._read(step, **args, **{META_ITEM: ocp.args.JsonRestore()})
                state, meta = {name: out[name] for name in abstract}, out[META_ITEM]
        except Exception as e:  # noqa: BLE001 - any failure to read is damage, said in one line
            raise CheckpointDamaged(step, f"cannot be read ({_first_line(e)})") from None
        expected = meta.get("checksums") or {}  # none in checkpoints older than checksums
        actual = item_checksums({name: state[name] for name in state if name in expected})
        bad = [name for name, digest in actual.items() if digest != expected[name]]
        if bad:
            raise CheckpointDamaged(step, f"item {', '.join(bad)} does not match the checksum "
                                          "saved with it")
        return Restored(step, state, meta)

    def set_aside(self, step: int) -> Path:
        """Move damaged checkpoint `step` out of the checkpoints kept (and out of the way
        of the step's next save) into damaged_checkpoints/ beside them: kept as
        evidence, never deleted here."""
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only")
        aside = self.directory.parent / DAMAGED_DIR
        aside.mkdir(exist_ok=True)
        target = aside / str(step)
        n = 1
        while target.exists():
            target, n = aside / f"{step}.{n}", n + 1
        (self.directory / str(step)).rename(target)
        self._manager.reload()
        return target

    def close(self) -> None:
        self._manager.close()
