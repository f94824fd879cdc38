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
