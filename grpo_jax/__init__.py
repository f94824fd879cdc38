"""grpo_jax: GRPO with hand-rolled LoRA on Gemma 3, in JAX."""

__version__ = "0.1.0"


def log_to_stderr() -> None:
    """Print the package's INFO lines (resuming, skipped rows, exports) on stderr.

    The CLIs call this instead of logging.basicConfig: importing orbax installs a
    WARNING-level root handler, which turns basicConfig into a no-op, and root at
    INFO would print orbax's chatter too.
    """
    import logging

    log = logging.getLogger("grpo_jax")
    if not log.handlers:  # a CLI's main() may run more than once in a process (tests)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def run_cli(body, *more_errors: type[BaseException]) -> int:
    """A CLI's exit status: 0 when `body()` returns; 2 with one line `error: ...` on
    stderr for bad input (ValueError and its kin: bad config, malformed data,
    mismatched checkpoints; a missing or existing file) or any of `more_errors`."""
    import sys

    log_to_stderr()
    try:
        body()
    except (ValueError, FileNotFoundError, FileExistsError, *more_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
