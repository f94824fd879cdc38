"""grpo_jax: GRPO with hand-rolled LoRA on Gemma 3, in JAX."""

import logging
import os
import sys

import jax

__version__ = "0.1.0"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes, not the stream it was at
    setup (a captured stream in tests may be closed by then)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def log_to_stderr() -> None:
    """Print the package's INFO lines (resuming, skipped rows, exports) on stderr.

    The CLIs call this instead of logging.basicConfig: importing orbax installs a
    WARNING-level root handler, which turns basicConfig into a no-op, and root at
    INFO would print orbax's chatter too.
    """
    log = logging.getLogger("grpo_jax")
    if not log.handlers:  # a CLI's main() may run more than once in a process (tests)
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def use_compilation_cache() -> str | None:
    """Keep compiled XLA programs on disk so a re-run or a resume skips compilation.

    On the 270M CPU run, compiling the sampler, reference pass and update for each
    new prompt-length bucket costs about 2 of its 20 minutes. JAX reads
    JAX_COMPILATION_CACHE_DIR itself; where it is unset the CLIs use
    $XDG_CACHE_HOME/grpo_jax/xla (~/.cache by default). JAX_COMPILATION_CACHE_DIR=
    (empty) turns the cache off. Returns the directory in use, or None.
    """
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return os.environ["JAX_COMPILATION_CACHE_DIR"] or None
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(root, "grpo_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def run_cli(body, *more_errors: type[BaseException]) -> int:
    """A CLI's exit status: 0 when `body()` returns; 2 with one line `error: ...` on
    stderr for bad input (ValueError and its kin: bad config, malformed data,
    mismatched or damaged checkpoints), a filesystem failure (any OSError: a missing
    or existing file, a path through a file, a refused write, a full disk), or any
    of `more_errors`."""
    log_to_stderr()
    use_compilation_cache()
    try:
        body()
    except (ValueError, OSError, *more_errors) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


def one_line(e: BaseException) -> str:
    """The error as one line; an OSError from the system names its path(s)."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
        text = f"{e.strerror}: {paths}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())
