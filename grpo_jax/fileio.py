"""Small file helpers shared by the run-directory writers."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that a reader (or a kill) sees the old file or the
    new one, never half of each: a temp file in the same directory, fsynced, then
    renamed over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(directory: str | os.PathLike) -> Path:
    """Create `directory` if needed and prove a file can be written in it, so a run
    learns before its work, not after, that its outputs cannot be saved. One-line
    errors: a path through a regular file, or a directory that refuses writes."""
    directory = Path(directory)
    for parent in (directory, *directory.parents):
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(
                    f"cannot write to {directory}: {parent} is a file, not a directory")
            break
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise OSError(f"cannot write to {directory}: {e.strerror or e}") from None
    return directory
