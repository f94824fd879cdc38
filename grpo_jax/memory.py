"""Keep the memory a process frees, for the commands that run the model again and again.

XLA:CPU allocates each program's temporaries when it runs and frees them after (the
270M's unshared update: ~9 GB a call). glibc hands large freed blocks back to the
kernel, its per-thread arenas included, so the next call faults every page in again,
and on VMs whose balloon reports free pages the host reclaims them in between. Measured
on machine D (AVX-512 BF16, 2 cores; docs/perf/README.md): the update faulted 4.4M
pages a call (17 GB) and spent 34-61 s of its 49-85 s in the kernel; with one arena
that keeps what is freed, 0 faults and 28 s.

glibc reads these settings once, when the process starts, so the commands set them and
start themselves again: `os.execv` keeps the PID, the standard streams and the
arguments. A MALLOC_ARENA_MAX already set (any value) is left alone: that is the way
to opt out, e.g. MALLOC_ARENA_MAX=8 python -m grpo_jax.train.
"""
from __future__ import annotations

import os
import platform
import sys

KEEP_FREED = {
    # One arena: the worker threads' allocations go where the settings below hold.
    "MALLOC_ARENA_MAX": "1",
    # Large blocks from the heap, never a separate mmap that free() unmaps.
    "MALLOC_MMAP_MAX_": "0",
    # Never give the heap's free top back to the kernel (1 TiB: never reached).
    "MALLOC_TRIM_THRESHOLD_": str(2 ** 40),
}


def applies(environ=os.environ) -> bool:
    """Whether a command should restart itself with KEEP_FREED: on glibc, unless the
    environment already chose an arena count."""
    return platform.libc_ver()[0] == "glibc" and "MALLOC_ARENA_MAX" not in environ


def keep_freed_memory() -> None:
    """Restart this command with KEEP_FREED in its environment (see the module text);
    no-op where it does not apply. Call it from a command's `__main__` only: it
    replaces the running process."""
    if not applies():
        return
    os.environ.update(KEEP_FREED)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
