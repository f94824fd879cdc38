"""Pallas TPU flash attention, forward and backward, for the update and prefill.

Contract as `kernels.reference.attention`: q [B, T, H, Dh], k/v [B, S, K, Dh] and a
`kernels.layout.Layout` (positions + segment ids); returns [B, T, H, Dh].

How it is laid out:
- Grouped-query attention without repeating K/V: the G = H / K query heads that
  share a KV head are folded into the query rows (row t * G + g), so one K/V block
  serves all G heads in one matmul of (block_q * G) rows, and dK/dV sum over the
  G heads by the matmul itself.
- Online softmax over KV blocks (the innermost, sequential grid axis) with the
  row max and sum in VMEM scratch; the forward saves the log-sum-exp per row, and
  the backward recomputes probabilities from it: one kernel accumulates dK, dV over
  the query blocks of a KV block, another dQ over the KV blocks of a query block.
- Block skipping: every query and KV block gets the min/max of its real tokens'
  positions and segments (scalar-prefetched to SMEM). A block pair that no
  causal / window / segment rule can connect is skipped, and the KV (or, in the
  dK/dV kernel, query) index map is clamped to the range of needed blocks, so
  blocks before a sliding window or after the diagonal are neither computed nor
  copied from HBM. Within a computed block the elementwise rule
  (`kernels.layout.visible`) masks.
- Lengths that are not block multiples are padded in the wrapper with PAD tokens.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from grpo_jax.kernels import online_softmax
from grpo_jax.kernels.layout import PAD, SHARED, Layout, visible
from grpo_jax.kernels.target import interpret_params, round_up

# Log-sum-exp of a row that sees nothing: exp(score - it) is 0 in the backward.
_EMPTY_LSE = 1e30
# Bounds of an empty block; twice it still fits in int32.
_BIG = 1 << 29
_STATS = 4  # per block: min position, max position, min segment, max segment


def _block_stats(positions, segments, block: int, xp=jnp):
    """[B, L] -> [B, L / block, 4]: bounds of each block's real (non-PAD) tokens
    (xp: jax.numpy in the program, numpy for the static cost figure)."""
    b, length = positions.shape
    pos = positions.reshape(b, length // block, block)
    seg = segments.reshape(b, length // block, block)
    real = seg != PAD
    return xp.stack([xp.where(real, pos, _BIG).min(-1), xp.where(real, pos, -_BIG).max(-1),
                     xp.where(real, seg, _BIG).min(-1), xp.where(real, seg, -_BIG).max(-1)],
                    axis=-1).astype(xp.int32)


def _blocks_meet(q_stats, kv_stats, window: int | None):
    """Could any query of a block see any key of another (`visible`, on bounds)?
    Each argument is a sequence of the four bounds (arrays or scalars)."""
    q_pmin, q_pmax, q_smin, q_smax = q_stats
    k_pmin, k_pmax, k_smin, k_smax = kv_stats
    meet = q_pmax >= k_pmin  # some key not after some query (empty blocks fail here)
    if window is not None:
        meet &= q_pmin - k_pmax < window
    return meet & ((k_smin == SHARED) | ((q_smax >= k_smin) & (k_smax >= q_smin)))


def _needed_range(meet: jax.Array) -> jax.Array:
    """meet [B, N, M] bool -> [B, N, 2] int32: first and last needed block per row
    (0, 0 when none: the block is fetched once and not computed)."""
    m = meet.shape[-1]
    idx = jnp.arange(m, dtype=jnp.int32)
    first = jnp.where(meet, idx, m).min(-1)
    last = jnp.where(meet, idx, -1).max(-1)
    none = last < 0
    return jnp.stack([jnp.where(none, 0, first), jnp.where(none, 0, last)], -1).astype(jnp.int32)


def _read_stats(ref, b, i, n):
    base = (b * n + i) * _STATS
    return [ref[base + c] for c in range(_STATS)]


def _clamped(ranges, b, i, n, j):
    base = (b * n + i) * 2
    return jnp.minimum(jnp.maximum(j, ranges[base]), ranges[base + 1])


def _scores(q, k, scale):
    """q [R, Dh] . k [C, Dh]^T in float32, scaled."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return s * scale


# ---------------------------------------------------------------------------
# Kernels. Grid (batch, kv head, outer block, inner block); refs carry leading
# unit dims of the batch / head block.


def _mask(qmeta_ref, kpos_ref, kseg_ref, window):
    """The block's elementwise rule: query rows' (position, segment) as the two columns
    of their [rows, 2] block, keys' as [1, bk] rows."""
    qmeta = qmeta_ref[0]
    return visible(qmeta[:, 0:1], qmeta[:, 1:2], kpos_ref[0], kseg_ref[0], window)


def _forward_kernel(q_stats, kv_stats, kv_ranges, q_ref, k_ref, v_ref, qmeta_ref,
                    kpos_ref, kseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                    scale, window, nq, nk):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        online_softmax.start(m_sc, l_sc, acc_sc)

    @pl.when(_blocks_meet(_read_stats(q_stats, b, i, nq), _read_stats(kv_stats, b, j, nk),
                          window))
    def _step():
        mask = _mask(qmeta_ref, kpos_ref, kseg_ref, window)
        online_softmax.accumulate(_scores(q_ref[0, 0], k_ref[0, 0], scale), mask, v_ref[0, 0],
                                  m_sc, l_sc, acc_sc)

    @pl.when(j == nk - 1)
    def _finish():
        out, l = online_softmax.finish(l_sc, acc_sc)
        o_ref[0, 0] = out.astype(o_ref.dtype)
        lse_ref[0, 0] = jnp.where(l > 0, m_sc[...] + jnp.log(jnp.where(l > 0, l, 1.0)),
                                  _EMPTY_LSE)


def _dkv_kernel(q_stats, kv_stats, q_ranges, q_ref, k_ref, v_ref, do_ref, lse_di_ref,
                qmeta_ref, kmeta_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale, window, nq, nk):
    """dK, dV of one KV block over the query blocks. Scores are taken transposed,
    [bk, rows], so the per-row scalars (lse, di, query positions and segments) lie
    along lanes and are read lane-dense, [2, rows], for every block pair (as
    [rows, 2] they would pad to 128 lanes); every matmul is then a plain one or one
    against a transposed right side."""
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(_blocks_meet(_read_stats(q_stats, b, i, nq), _read_stats(kv_stats, b, j, nk),
                          window))
    def _step():
        q, k, v, do = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], do_ref[0, 0]
        qmeta, kmeta, lse_di = qmeta_ref[0], kmeta_ref[0], lse_di_ref[0, 0]
        mask = visible(qmeta[0:1], qmeta[1:2], kmeta[:, 0:1], kmeta[:, 1:2], window)
        p = jnp.where(mask, jnp.exp(_scores(k, q, scale) - lse_di[0:1]), 0.0)  # [bk, rows]
        dv_sc[...] += jnp.dot(p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(v, do, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        ds = p * (dp - lse_di[1:2])
        dk_sc[...] += jnp.dot(ds.astype(q.dtype), q, preferred_element_type=jnp.float32) * scale

    @pl.when(i == nq - 1)
    def _finish():
        dk_ref[0, 0] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[0, 0] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(q_stats, kv_stats, kv_ranges, q_ref, k_ref, v_ref, do_ref, lse_di_ref,
               qmeta_ref, kpos_ref, kseg_ref, dq_ref, dq_sc, *, scale, window, nq, nk):
    """dQ of one query block over the KV blocks, probabilities recomputed from the
    saved log-sum-exp (per-row scalars as [rows, 2], read once per query block)."""
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(_blocks_meet(_read_stats(q_stats, b, i, nq), _read_stats(kv_stats, b, j, nk),
                          window))
    def _step():
        q, k, do, lse_di = q_ref[0, 0], k_ref[0, 0], do_ref[0, 0], lse_di_ref[0, 0]
        mask = _mask(qmeta_ref, kpos_ref, kseg_ref, window)
        p = jnp.where(mask, jnp.exp(_scores(q, k, scale) - lse_di[:, 0:1]), 0.0)
        dp = jax.lax.dot_general(do, v_ref[0, 0], (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        ds = p * (dp - lse_di[:, 1:2])
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * scale

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[0, 0] = dq_sc[...].astype(dq_ref.dtype)


# ---------------------------------------------------------------------------
# pallas_call plumbing. Kernel-side layout: qf [B, K, R, Dh] with R = Tp * G rows,
# kf/vf [B, K, Sp, Dh]; per-row scalars two to a row, as TPU tiling pads a row of
# them to 128 lanes anyway: query (position, segment) [B, R, 2], (lse, di) [B, K, R, 2]
# (the forward writes lse alone, [B, K, R, 1]); key positions and segments [B, 1, Sp].


class _Plan(NamedTuple):
    """Everything about the layout the kernels read (all int32)."""
    q_meta: jax.Array     # [B, R, 2]: each query row's position and segment
    q_meta_t: jax.Array   # [B, 2, R]: the same, lane-dense (the dK/dV kernel)
    kv_pos: jax.Array     # [B, 1, Sp]
    kv_seg: jax.Array     # [B, 1, Sp]
    kv_meta: jax.Array    # [B, Sp, 2]: each key's position and segment (dK/dV kernel)
    q_stats: jax.Array    # [B * nq * 4] block bounds (SMEM)
    kv_stats: jax.Array   # [B * nk * 4]
    kv_ranges: jax.Array  # [B * nq * 2] first and last KV block a query block needs
    q_ranges: jax.Array   # [B * nk * 2] first and last query block a KV block needs


def _specs(rows, bk, head_dim, q_map, kv_map):
    """BlockSpecs of (q-like, kv-like, per-row scalars of a width, q meta, kv meta)."""
    q_spec = pl.BlockSpec((1, 1, rows, head_dim), lambda b, h, *a: (b, h, q_map(b, *a), 0))
    kv_spec = pl.BlockSpec((1, 1, bk, head_dim), lambda b, h, *a: (b, h, kv_map(b, *a), 0))
    def row_spec(width):
        return pl.BlockSpec((1, 1, rows, width), lambda b, h, *a: (b, h, q_map(b, *a), 0))
    q_meta = pl.BlockSpec((1, rows, 2), lambda b, h, *a: (b, q_map(b, *a), 0))
    kv_meta = pl.BlockSpec((1, 1, bk), lambda b, h, *a: (b, 0, kv_map(b, *a)))
    return q_spec, kv_spec, row_spec, q_meta, kv_meta


def typical_pairs(q_len: int, kv_len: int, bq: int, bk: int, window: int | None,
                   shared_prefix) -> int:
    """Block pairs a batch row computes when it has no padding (the static figure the
    kernels report to XLA's cost analysis; padding only skips more)."""
    tp, sp = round_up(q_len, bq), round_up(kv_len, bk)

    def row(length, padded):
        pos = np.arange(padded, dtype=np.int32)
        seg = np.where(pos < length, SHARED, PAD).astype(np.int32)
        if shared_prefix is not None:
            prefix, group = shared_prefix
            steps = (length - prefix) // group
            comp = pos[prefix:length] - prefix
            pos[prefix:length] = prefix + comp % steps
            seg[prefix:length] = 2 + comp // steps
        return pos[None], seg[None]

    q_stats = _block_stats(*row(q_len, tp), bq, np)
    kv_stats = _block_stats(*row(kv_len, sp), bk, np)
    meet = _blocks_meet([q_stats[:, :, None, c] for c in range(_STATS)],
                        [kv_stats[:, None, :, c] for c in range(_STATS)], window)
    return int(meet.sum())


def schedule_cost(kind: str, units: int, rows: int, bk: int, head_dim: int, itemsize: int,
                  nq: int, nk: int, pairs: int) -> dict[str, int]:
    """FLOPs, exps and HBM bytes of one flash-attention kernel ("forward", "dkv", "dq")
    that computes `pairs` [rows x bk] score blocks for each of `units` (batch row, KV
    head) grids of nq query blocks by nk KV blocks, each block read once per outer
    block or once per computed pair as the kernel's grid order has it. Per-row
    scalars count as TPU tiling stores them: [rows, 1] or [rows, 2] blocks (query
    positions and segments, lse, di) padded to 128 lanes of 4 bytes, [1, bk] or
    [2, rows] ones to 8 sublanes. A model of the schedule (also
    used for JAX's bundled kernels in benchmarks/attention.py)."""
    q_block, kv_block = rows * head_dim * itemsize, bk * head_dim * itemsize
    row_scalars, kv_meta = rows * 128 * 4, 2 * 8 * bk * 4
    score = rows * bk * head_dim
    if kind == "forward":    # QK^T, PV; q, q meta in and o, lse out per query block
        flops, once, per_pair = 4 * score, nq * (2 * q_block + 2 * row_scalars), \
            2 * kv_block + kv_meta
    elif kind == "dkv":      # KQ^T, V dO^T, P dO, dS Q (transposed scores); q, dO, and
        # query meta and lse+di lane-dense ([2, rows], padded to 8 sublanes) per pair
        flops, once, per_pair = 8 * score, nk * (4 * kv_block + bk * 128 * 4), \
            2 * q_block + 2 * 8 * rows * 4
    elif kind == "dq":       # QK^T, dO V^T, dS K; q, dO, dQ, q meta, lse+di per query block
        flops, once, per_pair = 6 * score, nq * (3 * q_block + 2 * row_scalars), \
            2 * kv_block + kv_meta
    else:
        raise ValueError(f"unknown kernel {kind!r}")
    return {"flops": units * pairs * flops, "transcendentals": units * pairs * rows * bk,
            "bytes_accessed": units * (once + pairs * per_pair)}


def _cost(kind: str, qf, bk: int, rows: int, nk: int, pairs: int) -> pl.CostEstimate:
    b, k_heads, r, dh = qf.shape
    return pl.CostEstimate(**schedule_cost(kind, b * k_heads, rows, bk, dh, qf.dtype.itemsize,
                                           r // rows, nk, pairs))


def _compiler_params():
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _forward(qf, kf, vf, plan, cfg):
    scale, window, rows, bk, interpret, pairs = cfg
    b, k_heads, r, dh = qf.shape
    nq, nk = r // rows, kf.shape[2] // bk

    def kv_block(b, i, j, q_stats, kv_stats, kv_ranges):
        return _clamped(kv_ranges, b, i, nq, j)

    def q_block(b, i, j, *refs):
        return i

    q_spec, kv_spec, row_spec, q_meta, kv_meta = _specs(rows, bk, dh, q_block, kv_block)
    kernel = functools.partial(_forward_kernel, scale=scale, window=window, nq=nq, nk=nk)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, k_heads, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, q_meta, kv_meta, kv_meta],
            out_specs=[q_spec, row_spec(1)],
            scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32),
                            pltpu.VMEM((rows, 1), jnp.float32),
                            pltpu.VMEM((rows, dh), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(qf.shape, qf.dtype),
                   jax.ShapeDtypeStruct((b, k_heads, r, 1), jnp.float32)],
        compiler_params=_compiler_params(),
        cost_estimate=_cost("forward", qf, bk, rows, nk, pairs),
        interpret=interpret_params(interpret),
    )(plan.q_stats, plan.kv_stats, plan.kv_ranges, qf, kf, vf,
      plan.q_meta, plan.kv_pos, plan.kv_seg)


def _backward(qf, kf, vf, plan, o, lse, do, cfg):
    scale, window, rows, bk, interpret, pairs = cfg
    b, k_heads, r, dh = qf.shape
    nq, nk = r // rows, kf.shape[2] // bk
    di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    # lse and di side by side: one [rows, 2] block (the dQ kernel), and lane-dense
    # [2, rows] (the dK/dV kernel, which reads them for every block pair).
    lse_di = jnp.concatenate([lse, di], axis=-1)

    # dK, dV: grid (b, h, kv block j, query block i), query blocks clamped per j.
    def q_block_t(b, j, i, q_stats, kv_stats, q_ranges):
        return _clamped(q_ranges, b, j, nk, i)

    def kv_block_t(b, j, i, *refs):
        return j

    q_spec, kv_spec, _, _, _ = _specs(rows, bk, dh, q_block_t, kv_block_t)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, window=window, nq=nq, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, k_heads, nk, nq),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec,
                      pl.BlockSpec((1, 1, 2, rows),
                                   lambda b, h, j, i, *refs: (b, h, 0, q_block_t(b, j, i, *refs))),
                      pl.BlockSpec((1, 2, rows),
                                   lambda b, h, j, i, *refs: (b, 0, q_block_t(b, j, i, *refs))),
                      pl.BlockSpec((1, bk, 2), lambda b, h, j, i, *refs: (b, j, 0))],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, dh), jnp.float32),
                            pltpu.VMEM((bk, dh), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(kf.shape, kf.dtype),
                   jax.ShapeDtypeStruct(vf.shape, vf.dtype)],
        compiler_params=_compiler_params(),
        cost_estimate=_cost("dkv", qf, bk, rows, nk, pairs),
        interpret=interpret_params(interpret),
    )(plan.q_stats, plan.kv_stats, plan.q_ranges, qf, kf, vf, do, jnp.swapaxes(lse_di, 2, 3),
      plan.q_meta_t, plan.kv_meta)

    # dQ: grid (b, h, query block i, kv block j), kv blocks clamped per i.
    def kv_block(b, i, j, q_stats, kv_stats, kv_ranges):
        return _clamped(kv_ranges, b, i, nq, j)

    def q_block(b, i, j, *refs):
        return i

    q_spec, kv_spec, row_spec, q_meta, kv_meta = _specs(rows, bk, dh, q_block, kv_block)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, window=window, nq=nq, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, k_heads, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec(2), q_meta, kv_meta, kv_meta],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((rows, dh), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(qf.shape, qf.dtype),
        compiler_params=_compiler_params(),
        cost_estimate=_cost("dq", qf, bk, rows, nk, pairs),
        interpret=interpret_params(interpret),
    )(plan.q_stats, plan.kv_stats, plan.kv_ranges, qf, kf, vf, do, lse_di, plan.q_meta,
      plan.kv_pos, plan.kv_seg)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(qf, kf, vf, plan, cfg):
    return _forward(qf, kf, vf, plan, cfg)[0]


def _flash_fwd(qf, kf, vf, plan, cfg):
    o, lse = _forward(qf, kf, vf, plan, cfg)
    return o, (qf, kf, vf, plan, o, lse)


def _flash_bwd(cfg, residuals, do):
    qf, kf, vf, plan, o, lse = residuals
    dq, dk, dv = _backward(qf, kf, vf, plan, o, lse, do, cfg)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def block_shapes(q_len: int, kv_len: int, groups: int, block_q: int,
                 block_kv: int) -> tuple[int, int]:
    """The (query timesteps, keys) per block actually used: the requested sizes, or
    the whole (8-rounded) length when it is shorter."""
    bq = min(block_q, round_up(q_len, 8))
    bk = min(block_kv, round_up(kv_len, 8))
    return bq, bk


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: Layout, *,
                    scale: float, window: int | None = None, block_q: int = 128,
                    block_kv: int = 128, interpret: bool | None = None) -> jax.Array:
    """Attention by `layout` (see the module docstring). block_q counts query
    timesteps (each block holds block_q * H / K rows), block_kv keys; on a TPU
    block_kv should be a multiple of 128 unless it covers all keys."""
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv = k.shape[1], k.shape[2]
    if num_heads % num_kv:
        raise ValueError(f"{num_heads} query heads do not share {num_kv} KV heads evenly")
    groups = num_heads // num_kv
    bq, bk = block_shapes(q_len, kv_len, groups, block_q, block_kv)
    tp, sp = round_up(q_len, bq), round_up(kv_len, bk)

    def pad(x, length, axis=1):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, length - x.shape[axis])
        return jnp.pad(x, widths)

    # PAD (0) marks the padding, so it takes part in no score.
    q_pos, q_seg = pad(layout.q_positions, tp), pad(layout.q_segments, tp)
    kv_pos, kv_seg = pad(layout.kv_positions, sp), pad(layout.kv_segments, sp)
    q_stats, kv_stats = _block_stats(q_pos, q_seg, bq), _block_stats(kv_pos, kv_seg, bk)
    meet = _blocks_meet([q_stats[:, :, None, c] for c in range(_STATS)],
                        [kv_stats[:, None, :, c] for c in range(_STATS)], window)
    q_meta = jnp.repeat(jnp.stack([q_pos, q_seg], axis=-1), groups, axis=1)  # [B, R, 2]
    plan = _Plan(q_meta, jnp.swapaxes(q_meta, 1, 2), kv_pos[:, None, :], kv_seg[:, None, :],
                 jnp.stack([kv_pos, kv_seg], axis=-1),
                 q_stats.reshape(-1), kv_stats.reshape(-1),
                 _needed_range(meet).reshape(-1),
                 _needed_range(jnp.swapaxes(meet, 1, 2)).reshape(-1))

    # [B, T, K*G, Dh] -> [B, K, T*G, Dh]: row t * G + g is head k * G + g at time t.
    qf = pad(q, tp).reshape(batch, tp, num_kv, groups, head_dim)
    qf = qf.transpose(0, 2, 1, 3, 4).reshape(batch, num_kv, tp * groups, head_dim)
    kf = pad(k, sp).transpose(0, 2, 1, 3)
    vf = pad(v, sp).transpose(0, 2, 1, 3)
    pairs = typical_pairs(q_len, kv_len, bq, bk, window, layout.shared_prefix)
    cfg = (float(scale), window, bq * groups, bk, interpret, pairs)
    out = _flash(qf, kf, vf, plan, cfg)
    out = out.reshape(batch, num_kv, tp, groups, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, tp, num_heads, head_dim)[:, :q_len]
