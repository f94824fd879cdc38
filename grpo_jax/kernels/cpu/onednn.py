"""oneDNN's bfloat16 matmul as a `jax.ffi` custom call, for CPUs whose matrix units
XLA:CPU leaves idle.

On an Intel CPU with AMX, oneDNN's bf16 x bf16 -> f32 matmul runs on the AMX tiles;
XLA:CPU's own bfloat16 dot reaches them only in part (measured in docs/perf/README.md:
1.2-1.5x at an update's projection shapes, ~1.1x at its logits'). `--dtype auto`'s
probe (grpo_jax/model/dtype_choice.py) times this path beside XLA's and picks it only
where it wins.

The C++ source (onednn_matmul.cc) is compiled on first use with the machine's g++
against the running jaxlib's FFI headers and the oneDNN of PyPI's
`onednn-devel-cpu-gomp` (installed with the package on x86-64 Linux). Building at first
use, not at install, keeps the FFI headers those of the jaxlib that loads the
library (kernels/cpu/build.py); the result is cached per source, jax version and
oneDNN under $XDG_CACHE_HOME/grpo_jax/onednn. Where it cannot build or load, `unavailable()` says
why and the model keeps XLA's matmul.
"""
from __future__ import annotations

import ctypes
import functools
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from grpo_jax.kernels.cpu.build import build_library, compiler_named

SOURCE = Path(__file__).with_name("onednn_matmul.cc")
TARGET = "grpo_jax_onednn_matmul_bf16"
SYMBOL = "OnednnMatmulBf16"
# Matmuls with fewer rows than this stay with XLA. At a decode step's rows oneDNN was
# no faster on AMX: with plain weights it lost up to 256 rows; with weights pre-packed
# once per decode loop it tied at 16 rows and lost at 64, since each step streams
# every weight from memory either way (docs/perf/README.md, sessions 5 and 6).
MIN_ROWS = 512


def _prefixes() -> list[Path]:
    """Where pip puts oneDNN's headers and library: the environment's include/ and lib/."""
    return list(dict.fromkeys(Path(p) for p in (sys.prefix, sys.base_prefix)))


def find_onednn() -> tuple[Path, Path]:
    """(include dir, lib dir) of an installed oneDNN; FileNotFoundError naming where it looked."""
    for prefix in _prefixes():
        include, lib = prefix / "include", prefix / "lib"
        if (include / "oneapi" / "dnnl" / "dnnl.hpp").is_file() and (lib / "libdnnl.so").exists():
            return include, lib
    raise FileNotFoundError(
        "oneDNN not found (no include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so under "
        f"{', '.join(str(p) for p in _prefixes())}); pip install onednn-devel-cpu-gomp")


def build(compiler: str | None = None) -> Path:
    """The compiled custom call's shared library, built now unless cached. Raises
    RuntimeError (with the compiler's message) or FileNotFoundError when it cannot."""
    compiler = compiler_named(compiler)
    include, lib = find_onednn()
    return build_library(SOURCE, "onednn", [f"-I{include}"],
                         [f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib.resolve()}"], compiler)


@functools.cache
def _register() -> str | None:
    """Build, load and register the custom call once per process: None when it is
    ready, else why it is not."""
    if jax.default_backend() != "cpu":
        return f"the backend is {jax.default_backend()}, not the CPU"
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(library, SYMBOL)),
                                    platform="cpu")
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        return str(e)
    return None


def unavailable() -> str | None:
    """None when the oneDNN matmul can run here, else the reason (one line).
    A custom call has no sharding rule, so it is offered to one-device runs only."""
    if jax.process_count() != 1 or jax.local_device_count() != 1:
        return (f"{jax.device_count()} devices: the oneDNN call has no sharding rule, so "
                "it is used on one device only")
    reason = _register()
    return None if reason is None else " ".join(reason.split())[:500]


def _call(a: jax.Array, b: jax.Array, transpose_a: bool, transpose_b: bool) -> jax.Array:
    why_not = _register()  # a config that names oneDNN may reach here first
    if why_not is not None:
        raise RuntimeError(f"the oneDNN matmul cannot run here: {why_not}")
    m = a.shape[1] if transpose_a else a.shape[0]
    n = b.shape[0] if transpose_b else b.shape[1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32),
                            vmap_method="sequential")
    return call(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                transpose_a=transpose_a, transpose_b=transpose_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dot(a: jax.Array, b: jax.Array, transpose_a: bool = False,
        transpose_b: bool = False) -> jax.Array:
    """op(a) @ op(b) in float32 from bfloat16 operands (op: transpose when asked); both
    operands 2-D. Differentiable: the backward's two matmuls are this call too, with
    the transposes expressed as flags, never as copies."""
    return _call(a, b, transpose_a, transpose_b)


def _dot_fwd(a, b, transpose_a, transpose_b):
    return _call(a, b, transpose_a, transpose_b), (a, b)


def _dot_bwd(transpose_a, transpose_b, residuals, g):
    a, b = residuals
    # C = op(a) op(b): d op(a) = g op(b)^T, d op(b) = op(a)^T g; a transposed operand's
    # gradient is the transpose of that, computed by swapping the product's factors.
    if transpose_a:
        da = _call(b, g, transpose_b, True)
    else:
        da = _call(g, b, False, not transpose_b)
    if transpose_b:
        db = _call(g, a, True, transpose_a)
    else:
        db = _call(a, g, not transpose_a, False)
    return da.astype(a.dtype), db.astype(b.dtype)


dot.defvjp(_dot_fwd, _dot_bwd)


def expand_ellipsis(equation: str, ndim: int) -> str:
    """"...d,vd->...v" with the ellipsis spelled as letters for x's leading axes."""
    if "..." not in equation:
        return equation
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation]
    xs = equation.split(",")[0]
    return equation.replace("...", "".join(free[:ndim - (len(xs) - 3)]))


def einsum(equation: str, x: jax.Array, w: jax.Array,
           min_rows: int | None = None) -> jax.Array | None:
    """einsum(equation, x, w) in float32 through `dot`, or None when the equation is
    not one matmul (an axis shared by both operands and the output, a repeated axis,
    an ellipsis anywhere but x's and the output's front) or has fewer than
    `min_rows` (default MIN_ROWS) rows, tokens, in x (XLA is faster there)."""
    equation = expand_ellipsis(equation.replace(" ", ""), x.ndim)
    inputs, out = equation.split("->")
    xs, ws = inputs.split(",")
    if "." in equation or len(set(xs)) != len(xs) or len(set(ws)) != len(ws):
        return None
    contracted = [c for c in xs if c in ws and c not in out]
    x_free = [c for c in xs if c not in ws]
    w_free = [c for c in ws if c not in xs]
    if sorted(out) != sorted(x_free + w_free) or len(contracted) + len(x_free) != len(xs) \
            or len(contracted) + len(w_free) != len(ws):
        return None
    size = dict(zip(xs, x.shape)) | dict(zip(ws, w.shape))
    # x's rows (tokens): a decode step's few stay with XLA.
    if math.prod(size[c] for c in x_free) < (MIN_ROWS if min_rows is None else min_rows):
        return None

    def matrix(t, spec, first, second):
        """t as a [prod(first), prod(second)] matrix, and whether it is stored transposed
        (a transposed operand is a flag to oneDNN, not a copy)."""
        rows, cols = math.prod(size[c] for c in first), math.prod(size[c] for c in second)
        if list(spec) == first + second:
            return t.reshape(rows, cols), False
        if list(spec) == second + first:
            return t.reshape(cols, rows), True
        return jnp.transpose(t, [spec.index(c) for c in first + second]).reshape(rows, cols), False

    # The output's leading factor goes first (the sampler's vocabulary-major logits
    # are w @ x^T), so the result needs no transpose in the common cases.
    swap = list(out) == w_free + x_free != x_free + w_free
    left, right = (w_free, x_free) if swap else (x_free, w_free)
    (lt, ls), (rt, rs) = ((w, ws), (x, xs)) if swap else ((x, xs), (w, ws))
    a, ta = matrix(lt, ls, left, contracted)
    b, tb = matrix(rt, rs, contracted, right)
    y = dot(a, b, ta, tb).reshape([size[c] for c in left + right])
    produced = left + right
    if produced != list(out):
        y = jnp.transpose(y, [produced.index(c) for c in out])
    return y
