"""Attention at Gemma 3 1B's shapes: this project's XLA path and Pallas kernels beside
JAX's bundled Pallas TPU kernels (splash attention, flash attention).

    python benchmarks/attention.py --json > attention.json
    python benchmarks/attention.py --shapes 4x4096 --modes forward   # one shape

Per (batch x length, layer kind, mode, implementation):
- everywhere with libtpu (`.[tpu-aot]`): the program compiled for one TPU v5e chip
  (compile-only devices): XLA's FLOPs and bytes, the roofline time they imply on a
  v5e, and the compiled temporaries. These are compiled estimates, not measurements.
  A Pallas kernel is opaque to XLA: its FLOPs and bytes are the kernel's own
  `pl.CostEstimate` (this project's from its block schedule; the bundled kernels'
  as they declare them, which for splash is almost nothing and for flash the
  forward only). So every kernel also gets a "schedule" figure from one model of
  the blocks it computes and reads (`schedule`).
- on a TPU: measured times (best of --repeats).
- on any machine: correctness at a small shape, each kernel in TPU interpret mode
  against `kernels.reference` (relative error of outputs and gradients). CPU timings
  of interpreted kernels mean nothing, so none are taken.

Layer kinds: "local" (sliding window 512, 5 of Gemma 3's 6 layers) and "global"
(causal). Modes: "forward" (prefill, the reference pass) and "train" (forward and
backward, the update). Rows are whole (no padding): what the bundled kernels take.
The bundled flash attention has neither a window nor grouped KV heads: it runs
causal over the KV head repeated per query head, so on local layers it does the
global layer's work.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as jax_flash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from grpo_jax.kernels import reference
from grpo_jax.kernels.flash_attention import block_shapes, flash_attention, schedule_cost, typical_pairs
from grpo_jax.kernels.layout import self_layout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampler_throughput import best_time, cli_main  # noqa: E402

IMPLS = ("xla", "pallas", "splash", "jax_flash")
HEADS, KV_HEADS, HEAD_DIM, WINDOW = 4, 1, 256, 512  # Gemma 3 1B


@dataclasses.dataclass(frozen=True)
class Args:
    """Compare attention implementations at Gemma 3 1B's shapes."""

    shapes: tuple[str, ...] = ("64x256", "16x1024", "8x2048", "4x4096", "1x4096")
    """batch x length pairs."""
    layers: tuple[str, ...] = ("local", "global")
    modes: tuple[str, ...] = ("forward", "train")
    impls: tuple[str, ...] = IMPLS
    block_q: int = 128
    """This project's kernel: query timesteps a block (x 4 heads = 512 rows)."""
    block_kv: int = 128
    repeats: int = 5
    """Timed runs on a TPU; the fastest is reported."""
    check: bool = True
    """Check every implementation against the reference in interpret mode first."""
    json: bool = False
    """Print one JSON object instead of a readable summary."""


def _scale() -> float:
    return HEAD_DIM ** -0.5


def make_attention(impl: str, batch: int, length: int, layer: str, *, block_q: int = 128,
                   block_kv: int = 128, interpret: bool = False, local_window: int = WINDOW):
    """(q [B, T, H, Dh], k, v [B, T, K, Dh]) -> [B, T, H, Dh] by `impl`."""
    window = local_window if layer == "local" else None

    def layout():  # built in the traced program: no eager array on a compile-only device
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        return self_layout(positions, jnp.ones((batch, length), bool))

    if impl == "xla":
        return lambda q, k, v: reference.attention(q, k, v, layout(), scale=_scale(),
                                                   window=window)
    if impl == "pallas":
        return lambda q, k, v: flash_attention(q, k, v, layout(), scale=_scale(),
                                               window=window, block_q=block_q,
                                               block_kv=block_kv, interpret=interpret)
    if impl == "splash":  # one KV head shared by the query heads: the MQA kernel
        if window is None:
            head_mask = masks.CausalMask((length, length))
        else:
            head_mask = masks.LocalMask((length, length), (window - 1, 0), offset=0)
        blocks = min(512, length)
        kernel = splash.make_splash_mqa_single_device(
            masks.MultiHeadMask([head_mask] * HEADS), interpret=interpret,
            block_sizes=splash.BlockSizes(block_q=blocks, block_kv=blocks,
                                          block_kv_compute=min(128, length),
                                          block_q_dkv=blocks, block_kv_dkv=blocks,
                                          block_kv_dkv_compute=min(128, length),
                                          block_q_dq=blocks, block_kv_dq=blocks))

        def run(q, k, v):  # [B, T, H, Dh] -> per row [H, T, Dh] against [T, Dh]
            out = jax.vmap(kernel)((q * _scale()).transpose(0, 2, 1, 3),
                                   k[:, :, 0], v[:, :, 0])
            return out.transpose(0, 2, 1, 3)
        return run
    if impl == "jax_flash":  # no window, no grouped KV: causal over repeated KV heads
        blocks = min(512, length)
        sizes = jax_flash.BlockSizes(
            block_q=blocks, block_k_major=blocks, block_k=min(128, length), block_b=1,
            block_q_major_dkv=blocks, block_k_major_dkv=blocks, block_k_dkv=min(128, length),
            block_q_dkv=blocks, block_k_major_dq=blocks, block_k_dq=min(128, length),
            block_q_dq=blocks)

        def run(q, k, v):
            rep = lambda x: jnp.repeat(x, HEADS // KV_HEADS, axis=2).transpose(0, 2, 1, 3)  # noqa: E731
            out = jax_flash.flash_attention(q.transpose(0, 2, 1, 3), rep(k), rep(v),
                                            causal=True, sm_scale=_scale(), block_sizes=sizes)
            return out.transpose(0, 2, 1, 3)
        return run
    raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")


def program(attend, mode: str):
    """forward: the output. train: the output and dq, dk, dv of <out, cotangent>."""
    if mode == "forward":
        return attend

    def train(q, k, v, cotangent):
        out, vjp = jax.vjp(attend, q, k, v)
        return (out, *vjp(cotangent))
    return train


def inputs(batch: int, length: int, dtype, mode: str, key=None, sharding=None):
    shapes = [(batch, length, HEADS, HEAD_DIM), (batch, length, KV_HEADS, HEAD_DIM),
              (batch, length, KV_HEADS, HEAD_DIM)]
    if mode == "train":
        shapes.append((batch, length, HEADS, HEAD_DIM))
    if key is None:
        return [jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for s in shapes]
    keys = jax.random.split(key, len(shapes))
    return [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, shapes)]


def check(impls, block_q: int, block_kv: int) -> dict:
    """Relative error of each implementation against the float32 reference, at a small
    shape (2 x 256: local layers cross the 512 window only at 1024, so the window is 64
    here), kernels in TPU interpret mode."""
    out = {}
    batch, length, window = 2, 256, 64
    q, k, v, cot = inputs(batch, length, jnp.float32, "train", jax.random.key(0))
    for layer in ("local", "global"):
        want = program(make_attention("xla", batch, length, layer, local_window=window),
                       "train")(q, k, v, cot)
        for impl in impls:
            if impl == "xla" or (impl == "jax_flash" and layer == "local"):
                continue  # jax_flash has no window
            attend = make_attention(impl, batch, length, layer, block_q=min(block_q, 64),
                                    block_kv=block_kv, interpret=True, local_window=window)
            if impl == "jax_flash":  # it has no interpret flag of its own
                with pltpu.force_tpu_interpret_mode():
                    got = program(attend, "train")(q, k, v, cot)
            else:
                got = program(attend, "train")(q, k, v, cot)
            out[f"{impl}/{layer}"] = {
                name: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                for name, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
    return out


def schedule(impl: str, batch: int, length: int, layer: str, mode: str, block_q: int,
             block_kv: int, chip) -> dict | None:
    """A kernel's work from its block schedule, one model for every kernel
    (`kernels.flash_attention.schedule_cost`: blocks computed, blocks read per pair or
    per outer block), so the kernels compare on equal terms whatever they declare.
    pallas: query blocks of block_q x 4 heads, one KV head; splash (MQA): one head a
    grid row, 512-query blocks, block pairs at its 128-key compute granularity;
    jax_flash: one head a grid row over repeated KV, 512 x 512 blocks, causal only."""
    window = WINDOW if layer == "local" else None
    groups = HEADS // KV_HEADS
    if impl == "pallas":
        bq, bk = block_shapes(length, length, groups, block_q, block_kv)
        rows, units = bq * groups, batch * KV_HEADS
    elif impl == "splash":
        bq, bk = min(512, length), min(128, length)
        rows, units = bq, batch * HEADS
    elif impl == "jax_flash":
        bq = bk = min(512, length)
        rows, units, window = bq, batch * HEADS, None
    else:
        return None
    pairs = typical_pairs(length, length, bq, bk, window, None)
    nq, nk = -(-length // bq), -(-length // bk)
    kinds = ("forward",) if mode == "forward" else ("forward", "dkv", "dq")
    costs = [schedule_cost(k, units, rows, bk, HEAD_DIM, 2, nq, nk, pairs) for k in kinds]
    out = {key: sum(c[key] for c in costs) for key in costs[0]}
    out["roofline_s"] = max(out["flops"] / chip.bf16_flops,
                            out["bytes_accessed"] / chip.hbm_bandwidth)
    return out


def compiled_figures(compiled, chip) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops, moved = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    mem = compiled.memory_analysis()
    compute, memory = flops / chip.bf16_flops, moved / chip.hbm_bandwidth
    return {"flops": flops, "bytes_accessed": moved, "temp_bytes": mem.temp_size_in_bytes,
            "roofline_s": max(compute, memory), "bound": "compute" if compute >= memory
            else "memory"}


def run(args: Args) -> dict:
    for impl in args.impls:
        if impl not in IMPLS:
            raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
    shapes = []
    for text in args.shapes:
        try:
            b, t = (int(x) for x in text.split("x"))
        except ValueError:
            raise ValueError(f"--shapes {text!r}: expected BATCHxLENGTH, e.g. 16x1024") from None
        shapes.append((b, t))
    on_tpu = jax.default_backend() == "tpu"
    result = {"machine": platform.machine(), "backend": jax.default_backend(),
              "model_shapes": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                               "window": WINDOW, "dtype": "bfloat16"},
              "timings": "measured on this TPU" if on_tpu else
              "none: CPU timings of interpreted TPU kernels mean nothing"}
    if args.check:
        result["check_rel_err"] = check(args.impls, args.block_q, args.block_kv)
    try:
        from grpo_jax.dry_run import CHIPS, has_libtpu, topology_devices
    except ImportError:  # pragma: no cover
        has_libtpu = lambda: False  # noqa: E731
    if on_tpu:
        devices, chip = jax.devices()[:1], None
    elif has_libtpu():
        devices, chip = topology_devices("v5e:2x4")
        devices = devices[:1]
    else:
        result["compiled"] = "skipped: no libtpu (pip install -e '.[tpu-aot]')"
        return result
    chip = chip or CHIPS["v5e"]
    result["chip"] = dataclasses.asdict(chip)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("x",))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rows = []
    for batch, length in shapes:
        for layer in args.layers:
            for mode in args.modes:
                for impl in args.impls:
                    row = {"batch": batch, "length": length, "layer": layer, "mode": mode,
                           "impl": impl}
                    # Built outside the mesh (splash builds its block masks eagerly), traced
                    # and compiled under it (so this project's kernels compile for the TPU).
                    fn = jax.jit(program(make_attention(impl, batch, length, layer,
                                                        block_q=args.block_q,
                                                        block_kv=args.block_kv), mode))
                    start = time.perf_counter()
                    try:
                        with jax.set_mesh(mesh):
                            compiled = fn.lower(*inputs(batch, length, jnp.bfloat16, mode,
                                                        sharding=whole)).compile()
                    except Exception as e:  # noqa: BLE001 - reported, not fatal
                        row["error"] = " ".join(str(e).split())[:300]
                        rows.append(row)
                        continue
                    row["compile_s"] = time.perf_counter() - start
                    row.update(compiled_figures(compiled, chip))
                    model = schedule(impl, batch, length, layer, mode, args.block_q,
                                     args.block_kv, chip)
                    if model is not None:
                        row["schedule"] = model
                    if on_tpu:
                        data = inputs(batch, length, jnp.bfloat16, mode, jax.random.key(1))
                        compiled(*data)
                        row["time_s"], _ = best_time(functools.partial(compiled, *data),
                                                     args.repeats)
                    rows.append(row)
    result["rows"] = rows
    return result


def main(argv=None) -> int:
    return cli_main(Args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
