"""Compiling a CPU custom call's C++ source into a shared library, at first use.

Building at first use, not at install, keeps the FFI headers those of the jaxlib
that loads the library. The result is cached per source, jax version, flags and
compiler under $XDG_CACHE_HOME/grpo_jax/<kind>, built beside its final name and
renamed, so a concurrent process never loads half a file.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax


def cache_root() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "grpo_jax"


def compiler_named(compiler: str | None = None) -> str:
    """The C++ compiler to use (`compiler`, else $CXX, else g++); FileNotFoundError
    when it is not on PATH."""
    compiler = compiler or os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise FileNotFoundError(f"no C++ compiler {compiler!r} on PATH")
    return compiler


def build_library(source: Path, kind: str, flags: list[str] = (), libs: list[str] = (),
                  compiler: str | None = None) -> Path:
    """`source` compiled (g++ or $CXX) with the FFI headers and `flags`, linked with
    `libs`, as a cached shared library. FileNotFoundError without a compiler,
    RuntimeError (with the compiler's message) when the build fails."""
    compiler = compiler_named(compiler)
    ffi_include = jax.ffi.include_dir()
    key = hashlib.sha256("|".join(
        [source.read_text(), jax.__version__, ffi_include, compiler, *flags, *libs]).encode()
    ).hexdigest()[:16]
    out = cache_root() / kind / key / f"libgrpo_jax_{kind}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{ffi_include}",
               *flags, str(source), *libs, "-o", str(partial)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"building {source.name} failed: {done.stderr.strip()[-2000:]}")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out
