"""The model's matmul by path (XLA float32, XLA bfloat16, oneDNN bfloat16) at the
270M's shapes and a range of row counts: alone (one jitted call, best of --repeats)
and inside a loop (the MLP's two projections chained in a `fori_loop`, as a decode
step runs them), which is what decides `onednn.MIN_ROWS`.

    python benchmarks/matmul_paths.py --out docs/perf/matmul_paths_amx.json

oneDNN is timed where it builds and runs (`grpo_jax.kernels.cpu.onednn`), with every
row count sent to it (MIN_ROWS lifted for the measurement).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import tyro

from grpo_jax.kernels.cpu import onednn
from grpo_jax.model.config import GEMMA3_270M
from grpo_jax.model.matmul import matmul

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampler_throughput import machine_facts, write_result  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Args:
    """Time the model's matmul paths by shape and row count."""

    rows: tuple[int, ...] = (16, 64, 256, 512, 1024)
    """Rows (tokens) of the activation operand."""
    repeats: int = 7
    loop_iters: int = 200
    """Chained MLP pairs per timed loop."""
    out: str | None = None
    """Also write the JSON here."""


PATHS = {"xla_float32": ("float32", "xla"), "xla_bfloat16": ("bfloat16", "xla"),
         "onednn_bfloat16": ("bfloat16", "onednn")}


def _best(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def run(args: Args) -> dict:
    cfg = GEMMA3_270M
    d, f, v = cfg.embed_dim, cfg.ffw_dim, cfg.vocab_size
    paths = {k: p for k, p in PATHS.items() if p[1] == "xla" or onednn.unavailable() is None}
    onednn.MIN_ROWS = 1  # every row count through oneDNN: the measurement behind the bound
    alone = {}
    for name, eq, w_shape in (("up", "bd,df->bf", (d, f)), ("down", "bf,fd->bd", (f, d)),
                              ("logits", "bd,vd->bv", (v, d))):
        k = w_shape[0] if name != "logits" else d
        n = w_shape[1] if name != "logits" else v
        for rows in args.rows:
            entry = alone.setdefault(f"{name} {rows}x{k}x{n}", {})
            for path, (dtype, impl) in paths.items():
                x, w = jnp.ones((rows, k), dtype), jnp.ones(w_shape, dtype)
                fn = jax.jit(lambda x, w, eq=eq, dtype=dtype, impl=impl: matmul(
                    eq, x, w, dtype, jnp.float32, impl=impl))
                entry[path] = 2.0 * rows * k * n / _best(fn, x, w, repeats=args.repeats) / 1e9
    loop = {}
    for rows in args.rows:
        entry = loop.setdefault(f"mlp pair {rows} rows", {})
        for path, (dtype, impl) in paths.items():
            w1 = jnp.full((d, f), 1e-3, dtype)
            w2 = jnp.full((f, d), 1e-3, dtype)

            def body(_, x, w1=w1, w2=w2, dtype=dtype, impl=impl):
                h = matmul("bd,df->bf", x, w1, dtype, impl=impl)
                return matmul("bf,fd->bd", h, w2, dtype, impl=impl) + x

            fn = jax.jit(lambda x, body=body: jax.lax.fori_loop(0, args.loop_iters, body, x))
            seconds = _best(fn, jnp.ones((rows, d), dtype), repeats=3) / args.loop_iters
            entry[path] = {"us_per_pair": seconds * 1e6,
                           "gflops": 4.0 * rows * d * f / seconds / 1e9}
    return {"machine": machine_facts(), "alone_gflops": alone, "decode_like_loop": loop,
            "onednn": onednn.unavailable() or "runs"}


def main(argv=None) -> int:
    args = tyro.cli(Args, args=argv)
    write_result(run(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
