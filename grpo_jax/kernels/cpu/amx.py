"""A decode step's matmuls, and the teacher-forced log-softmax over the vocabulary,
on Intel AMX tiles as `jax.ffi` custom calls.

A decode step multiplies the batch's few rows by every weight once, so its time is
the time to stream the weights from memory. XLA:CPU re-lays out a plain bf16
weight at every such call and reached ~3 GB/s of weights at 16 rows on an AMX
machine (a 640 x 2048 projection: ~400 us cold); oneDNN, packed or not, did no
better (docs/perf/README.md, sessions 5-6). `amx_matmul.cc` reads each weight once,
straight into the tile instructions: ~70 us for that projection at 16 rows.

Two products, bf16 operands summed in float32:
  * `packed_einsum`: a projection with its weight `pack`ed once per decode loop into
    AMX's tile layout (a pure transpose in JAX: `pack`);
  * `rows_matmul`: w [R, K] @ x [M, K]^T with w as stored, for the embedding's
    vocabulary-major logits.
and, for the same loop, `write_token`: a step's keys or values written into a bf16
KV cache in place (XLA:CPU has no bf16 scatter; its select rewrites the whole cache),
and `gather_rows`: its tokens' embedding rows (XLA:CPU gathers from a float32 copy of
the table, made once per decode call: ~0.3 s for the 270M).

For the trainer's log p(target) over a tied vocabulary [V, D] (`vocab_parallel.
tied_logprobs`): `logsumexp` keeps each row's log-sum-exp while 32 x 32 blocks of
logits pass through tiles, and `softmax_rows` gives the softmax-weighted sum of the
embedding's rows its gradient needs, block by block. XLA materialised the [rows, V]
float32 logits three times a chunk for these (~1 of a chunk's ~1.5 s).

Built at first use like the oneDNN call (kernels/cpu/build.py); `unavailable()` says
why it cannot run here (no AMX, several devices, no compiler, the kernel refused
the tile state), and the model keeps XLA's matmuls there.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import platform
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.kernels.cpu.build import build_library

SOURCE = Path(__file__).with_name("amx_matmul.cc")
PACKED_TARGET = "grpo_jax_amx_packed_matmul_bf16"
ROWS_TARGET = "grpo_jax_amx_rows_matmul_bf16"
WRITE_TARGET = "grpo_jax_kv_write_token_bf16"
GATHER_TARGET = "grpo_jax_gather_rows_bf16"
LOGSUMEXP_TARGET = "grpo_jax_amx_logsumexp_bf16"
SOFTMAX_ROWS_TARGET = "grpo_jax_amx_softmax_rows_bf16"
SYMBOLS = {PACKED_TARGET: "AmxPackedMatmulBf16", ROWS_TARGET: "AmxRowsMatmulBf16",
           WRITE_TARGET: "KvWriteTokenBf16", GATHER_TARGET: "GatherRowsBf16",
           LOGSUMEXP_TARGET: "AmxLogSumExpBf16", SOFTMAX_ROWS_TARGET: "AmxSoftmaxRowsBf16"}
FLAGS = ["-O3", "-mamx-tile", "-mamx-bf16", "-mavx512f"]
# Weights' axes are blocked by 32: 2 tiles of 16 columns by 16 pairs of K.
BLOCK = 32


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build(compiler: str | None = None) -> Path:
    """The compiled custom calls' shared library (cached)."""
    return build_library(SOURCE, "amx", FLAGS, compiler=compiler)


def cpu_reason() -> str | None:
    """None on an x86-64 Linux CPU with AMX's bf16 tiles, else what it lacks."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"AMX needs x86-64 Linux, not {sys.platform} on {platform.machine()}"
    missing = {"amx_tile", "amx_bf16"} - cpu_flags()
    return f"this CPU has no {' or '.join(sorted(missing))}" if missing else None


@functools.cache
def _register() -> str | None:
    """Check, build, load and register once per process: None when the calls can run,
    else why not."""
    if jax.default_backend() != "cpu":
        return f"the backend is {jax.default_backend()}, not the CPU"
    reason = cpu_reason()
    if reason is not None:
        return reason
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
        error = library.GrpoJaxAmxRequest()
        if error:
            return f"Linux refused the AMX tile state (errno {error})"
        for target, symbol in SYMBOLS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                        platform="cpu")
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        return " ".join(str(e).split())[:500]
    return None


def unavailable() -> str | None:
    """None when the AMX calls can run here, else the reason (one line). A custom
    call has no sharding rule, so it is offered to one-device runs only."""
    if jax.process_count() != 1 or jax.local_device_count() != 1:
        return (f"{jax.device_count()} devices: the AMX calls have no sharding rule, so "
                "they run on one device only")
    return _register()


def _ready() -> None:
    why_not = _register()
    if why_not is not None:
        raise RuntimeError(f"the AMX matmul cannot run here: {why_not}")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["data"],
                   meta_fields=["equation", "shape"])
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A weight of `shape` for einsum(`equation`, x, w), its [K, N] matrix laid out in
    AMX tiles: [N/32, K/32, 2, 16, 16, 2] bfloat16, block (n, k) holding two 16-column
    tiles of 16 K-pairs. Inference only: no gradient flows through it."""
    data: jax.Array
    equation: str
    shape: tuple[int, ...]


def _split(equation: str) -> tuple[str, str, str, str]:
    """(x's free axes, contracted axes, w's free axes, out) of an einsum whose x is
    free-then-contracted, w contracted-then-free and out x-free-then-w-free, the
    layout of every projection; ValueError for any other."""
    inputs, out = equation.replace(" ", "").split("->")
    xs, ws = inputs.split(",")
    contracted = "".join(c for c in xs if c in ws)
    x_free, w_free = xs[:len(xs) - len(contracted)], ws[len(contracted):]
    if (xs != x_free + contracted or ws != contracted + w_free or out != x_free + w_free
            or len(set(xs + ws)) != len(x_free + contracted + w_free)):
        raise ValueError(f"{equation!r} is not x[free, contracted] @ w[contracted, free]")
    return x_free, contracted, w_free, out


def packable(equation: str, shape: tuple[int, ...]) -> bool:
    """Whether a weight of `shape` for `equation` has the layout and the block
    multiples `pack` needs."""
    try:
        _, contracted, w_free, _ = _split(equation)
    except ValueError:
        return False
    k, n = math.prod(shape[:len(contracted)]), math.prod(shape[len(contracted):])
    return len(shape) == len(contracted + w_free) and k % BLOCK == 0 and n % BLOCK == 0


def pack(equation: str, w: jax.Array) -> PackedWeight:
    """w (cast to bfloat16) in AMX tiles for einsum(equation, x, w). A transpose, run
    once per decode loop: element [k, n] of w's matrix goes to
    [n // 32, k // 32, (n // 16) % 2, (k // 2) % 16, n % 16, k % 2]."""
    if not packable(equation, tuple(w.shape)):
        raise ValueError(f"a weight of shape {tuple(w.shape)} for {equation!r} cannot be "
                         f"packed: it needs x[free, contracted] @ w[contracted, free] with "
                         f"both sides multiples of {BLOCK}")
    contracted = len(_split(equation)[1])
    k, n = math.prod(w.shape[:contracted]), math.prod(w.shape[contracted:])
    tiles = w.astype(jnp.bfloat16).reshape(k // 32, 16, 2, n // 32, 2, 16)
    return PackedWeight(tiles.transpose(3, 0, 4, 1, 5, 2), equation.replace(" ", ""),
                        tuple(w.shape))


def packed_einsum(equation: str, x: jax.Array, w: PackedWeight) -> jax.Array:
    """einsum(equation, x, w) in float32, for a weight packed for this equation."""
    equation = equation.replace(" ", "")
    if equation != w.equation:
        raise ValueError(f"a weight packed for {w.equation!r} cannot run {equation!r}")
    x_free, contracted, w_free, _ = _split(equation)
    if x.shape[len(x_free):] != w.shape[:len(contracted)]:
        raise ValueError(f"x of shape {x.shape} does not contract with a weight of shape "
                         f"{w.shape} in {equation!r}")
    _ready()
    k, n = math.prod(w.shape[:len(contracted)]), math.prod(w.shape[len(contracted):])
    rows = x.shape[:len(x_free)]
    call = jax.ffi.ffi_call(PACKED_TARGET,
                            jax.ShapeDtypeStruct((math.prod(rows), n), jnp.float32),
                            vmap_method="sequential")
    y = call(x.astype(jnp.bfloat16).reshape(-1, k), w.data)
    return y.reshape(rows + w.shape[len(contracted):])


def rows_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """w [R, K] @ x [M, K]^T -> [R, M] float32, w read as stored (R and K multiples of
    32): the vocabulary-major logits of hidden states x against the embedding w."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"rows_matmul takes x [M, K] and w [R, K], not {x.shape} and "
                         f"{w.shape}")
    if w.shape[0] % BLOCK or w.shape[1] % BLOCK:
        raise ValueError(f"rows_matmul needs R and K multiples of {BLOCK}, not {w.shape}")
    _ready()
    call = jax.ffi.ffi_call(ROWS_TARGET, jax.ShapeDtypeStruct((w.shape[0], x.shape[0]),
                                                              jnp.float32),
                            vmap_method="sequential")
    return call(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))


def write_token(buf: jax.Array, token: jax.Array, slots: jax.Array, keys: bool) -> jax.Array:
    """buf (bfloat16 keys [B, K, Dh, S] or values [B, K, S, Dh]) with token [B, K, Dh]
    written at each row's slot [B], in place: the result aliases buf."""
    if buf.dtype != jnp.bfloat16 or buf.ndim != 4 or token.shape != (
            buf.shape[0], buf.shape[1], buf.shape[2] if keys else buf.shape[3]):
        layout = "[B, K, Dh, S]" if keys else "[B, K, S, Dh]"
        raise ValueError(f"write_token takes a bfloat16 cache {layout} and a token "
                         f"[B, K, Dh], not {buf.dtype} {buf.shape} and {token.shape}")
    _ready()
    call = jax.ffi.ffi_call(WRITE_TARGET, jax.ShapeDtypeStruct(buf.shape, buf.dtype),
                            input_output_aliases={0: 0}, vmap_method="sequential")
    return call(buf, token.astype(buf.dtype), slots.astype(jnp.int32), keys=keys)


def gather_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table [V, D] (bfloat16) at ids (any shape, clipped to [0, V)) -> ids.shape + [D]."""
    if table.dtype != jnp.bfloat16 or table.ndim != 2:
        raise ValueError(f"gather_rows takes a bfloat16 table [V, D], not {table.dtype} "
                         f"{table.shape}")
    _ready()
    call = jax.ffi.ffi_call(GATHER_TARGET, jax.ShapeDtypeStruct(
        (math.prod(ids.shape), table.shape[1]), table.dtype), vmap_method="sequential")
    return call(table, ids.reshape(-1).astype(jnp.int32)).reshape(*ids.shape, table.shape[1])


def _tied_operands(x: jax.Array, w: jax.Array, name: str) -> None:
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"{name} takes x [M, K] and w [V, K], not {x.shape} and {w.shape}")
    if x.shape[0] % BLOCK or w.shape[0] % BLOCK or w.shape[1] % BLOCK:
        raise ValueError(f"{name} needs M, K and V multiples of {BLOCK}, not x {x.shape} "
                         f"and w {w.shape}")


def logsumexp(x: jax.Array, w: jax.Array, scale: float) -> jax.Array:
    """log sum_v exp(scale * w[v] . x[m]) -> [M] float32, for x [M, K] and w [V, K]
    (bfloat16 products summed in float32; M, K, V multiples of 32), without the
    [M, V] logits ever in memory."""
    _tied_operands(x, w, "logsumexp")
    _ready()
    call = jax.ffi.ffi_call(LOGSUMEXP_TARGET, jax.ShapeDtypeStruct(x.shape[:1], jnp.float32),
                            vmap_method="sequential")
    return call(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), scale=np.float32(scale))


def softmax_rows(x: jax.Array, w: jax.Array, lse: jax.Array, scale: float) -> jax.Array:
    """sum_v p[m, v] w[v, :] -> [M, K] float32, p[m, v] = exp(scale * w[v] . x[m] -
    lse[m]) rounded to bfloat16: the softmax-weighted mean of w's rows that the
    log-softmax's gradient needs, block by block without the [M, V] logits."""
    _tied_operands(x, w, "softmax_rows")
    if lse.shape != x.shape[:1]:
        raise ValueError(f"softmax_rows takes lse {x.shape[:1]}, not {lse.shape}")
    _ready()
    call = jax.ffi.ffi_call(SOFTMAX_ROWS_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32),
                            vmap_method="sequential")
    return call(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), lse.astype(jnp.float32),
                scale=np.float32(scale))
