"""The commands keep the memory they free (grpo_jax/memory.py): they restart once with
glibc's settings, the same process, and its freed memory is then reused without
faulting pages in again."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from grpo_jax import memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in memory.KEEP_FREED}
    return {**env, **extra}


def test_a_command_restarts_once_as_the_same_process_with_the_settings():
    code = textwrap.dedent("""
        import os, sys
        from grpo_jax import memory
        print("start", os.getpid(), os.environ.get("MALLOC_ARENA_MAX"), sys.argv[1:])
        memory.keep_freed_memory()
        print("after", os.getpid(), *(os.environ.get(k) for k in memory.KEEP_FREED))
    """)
    out = subprocess.run([sys.executable, "-c", code, "--flag", "x y"], env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [line.split(" ", 2) for line in out.stdout.splitlines()]
    pid = lines[0][1]
    # Printed before the restart (flushed), then again after it, arguments kept.
    assert [line[0] for line in lines] == ["start", "start", "after"]
    assert all(line[1] == pid for line in lines)
    assert lines[0][2] == "None ['--flag', 'x y']" and lines[1][2] == "1 ['--flag', 'x y']"
    assert lines[2][2] == " ".join(memory.KEEP_FREED.values())
    # An arena count the user set is theirs: no restart.
    out = subprocess.run([sys.executable, "-c", code], env=_env(MALLOC_ARENA_MAX="4"),
                         capture_output=True, text=True, timeout=60)
    assert [line.split()[0] for line in out.stdout.splitlines()] == ["start", "after"]
    assert not memory.applies({"MALLOC_ARENA_MAX": "8"})


_RETAINED = textwrap.dedent("""
    import os, threading
    import numpy as np

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def fill():  # 256 MB in a worker thread, as XLA's threads allocate, then freed
        x = np.ones(2 ** 26, np.float32)
        del x

    before = rss()
    t = threading.Thread(target=fill)
    t.start()
    t.join()
    print(rss() - before)
""")


def test_freed_memory_stays_in_the_process():
    grown = {}
    for name, env in (("kept", _env(**memory.KEEP_FREED)), ("glibc", _env())):
        out = subprocess.run([sys.executable, "-c", _RETAINED], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        grown[name] = int(out.stdout) / 2 ** 20
    # glibc unmaps the 256 MB at free (the next call faults it all in again); kept, it
    # stays resident for the next allocation.
    assert grown["glibc"] < 64 and grown["kept"] > 192, grown
