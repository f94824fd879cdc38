"""What every command line entry point does before and around its work: one-line
errors, the package's log lines on stderr, the compilation cache, the JAX platforms
this machine has, and the filters for a failed checkpoint read's aftermath. Library
modules change no global state at import; these run only from a CLI's `main`."""
from __future__ import annotations

import glob
import importlib.metadata
import logging
import os
import sys

import jax

from grpo_jax import checkpoint


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

    Compiling the sampler, reference pass and update is a noticeable share of a CPU
    run (docs/cpu_recipe.md). JAX reads
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
    choose_platforms()
    log_to_stderr()
    use_compilation_cache()
    checkpoint.quiet_failed_read_aftermath()
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


# Google's PCI vendor id: how a Cloud TPU VM's chips show up before any driver runs.
_GOOGLE_PCI_VENDOR = "0x1ae0"


def tpu_present() -> bool:
    """Whether this machine has TPU chips (PCI devices of Google's vendor id, or the
    /dev/accel* nodes TPU VMs expose)."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return bool(glob.glob("/dev/accel[0-9]*"))


def _gpu_platforms() -> list[str]:
    """GPU platforms whose JAX plugin is installed (jax-cuda*/jax-rocm* plugins)."""
    names = {ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")}
    try:
        import jax_plugins
        import pkgutil
        names |= {m.name for m in pkgutil.iter_modules(jax_plugins.__path__)}
    except ImportError:
        pass
    return [p for p in ("cuda", "rocm") if any(p in n for n in names)]


def choose_platforms() -> str | None:
    """Keep JAX off the TPU backend on a machine without a TPU.

    With libtpu installed (the dry run's compile-only devices need it), JAX's default
    platform search initialises the TPU backend on any machine, and libtpu prints
    five lines of errors on one without a chip before the command's own output.
    JAX_PLATFORMS (or jax_platforms already set) is respected as it is; otherwise,
    without a TPU, the platforms are the installed GPU plugins' and the CPU. The dry
    run's compile-only TPU devices come from libtpu directly and need no backend.
    Returns the platforms set, or None when left to JAX."""
    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or tpu_present():
        return None
    platforms = ",".join(_gpu_platforms() + ["cpu"])
    jax.config.update("jax_platforms", platforms)
    return platforms
