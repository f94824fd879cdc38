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

from kernels import online_softmax
from kernels.layout import PAD, SHARED, Layout, visible
from kernels.target import interpret_params, round_up

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


def _forward_kernel(q_stats, kv_stats, kv_ranges, q_ref, k_ref, v_ref, qpos_ref, qseg_ref,
                    kpos_ref, kseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                    scale, window, nq, nk):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        online_softmax.start(m_sc, l_sc, acc_sc)

    @pl.when(_blocks_meet(_read_stats(q_stats, b, i, nq), _read_stats(kv_stats, b, j, nk),
                          window))
    def _step():
        mask = visible(qpos_ref[0], qseg_ref[0], kpos_ref[0], kseg_ref[0], window)
        online_softmax.accumulate(_scores(q_ref[0, 0], k_ref[0, 0], scale), mask, v_ref[0, 0],
                                  m_sc, l_sc, acc_sc)

    @pl.when(j == nk - 1)
    def _finish():
        out, l = online_softmax.finish(l_sc, acc_sc)
        o_ref[0, 0] = out.astype(o_ref.dtype)
        lse_ref[0, 0] = jnp.where(l > 0, m_sc[...] + jnp.log(jnp.where(l > 0, l, 1.0)),
                                  _EMPTY_LSE)


def _score_grads(refs, window, scale):
    """Probabilities p and score gradients dS = p * (dO V^T - di) of one block pair,
    recomputed from the saved log-sum-exp: (q, k, do, p, ds)."""
    q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref = refs
    q, k, do = q_ref[0, 0], k_ref[0, 0], do_ref[0, 0]
    mask = visible(qpos_ref[0], qseg_ref[0], kpos_ref[0], kseg_ref[0], window)
    p = jnp.where(mask, jnp.exp(_scores(q, k, scale) - lse_ref[0, 0]), 0.0)
    dp = jax.lax.dot_general(do, v_ref[0, 0], (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return q, k, do, p, p * (dp - di_ref[0, 0])


def _dkv_kernel(q_stats, kv_stats, q_ranges, *refs, scale, window, nq, nk):
    inputs, (dk_ref, dv_ref, dk_sc, dv_sc) = refs[:10], refs[10:]
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(_blocks_meet(_read_stats(q_stats, b, i, nq), _read_stats(kv_stats, b, j, nk),
                          window))
    def _step():
        q, _, do, p, ds = _score_grads(inputs, window, scale)
        t0 = (((0,), (0,)), ((), ()))  # contract the rows: p^T @ do, ds^T @ q
        dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, t0,
                                          preferred_element_type=jnp.float32)
        dk_sc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, t0,
                                          preferred_element_type=jnp.float32) * scale

    @pl.when(i == nq - 1)
    def _finish():
        dk_ref[0, 0] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[0, 0] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(q_stats, kv_stats, kv_ranges, *refs, scale, window, nq, nk):
    inputs, (dq_ref, dq_sc) = refs[:10], refs[10:]
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(_blocks_meet(_read_stats(q_stats, b, i, nq), _read_stats(kv_stats, b, j, nk),
                          window))
    def _step():
        _, k, _, _, ds = _score_grads(inputs, window, scale)
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * scale

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[0, 0] = dq_sc[...].astype(dq_ref.dtype)


# ---------------------------------------------------------------------------
# pallas_call plumbing. Kernel-side layout: qf [B, K, R, Dh] with R = Tp * G rows,
# kf/vf [B, K, Sp, Dh]; per-row scalars (query positions, segments, lse, di)
# [B, (K,) R, 1]; key positions and segments [B, 1, Sp].


class _Plan(NamedTuple):
    """Everything about the layout the kernels read (all int32)."""
    q_pos: jax.Array      # [B, R, 1]
    q_seg: jax.Array      # [B, R, 1]
    kv_pos: jax.Array     # [B, 1, Sp]
    kv_seg: jax.Array     # [B, 1, Sp]
    q_stats: jax.Array    # [B * nq * 4] block bounds (SMEM)
    kv_stats: jax.Array   # [B * nk * 4]
    kv_ranges: jax.Array  # [B * nq * 2] first and last KV block a query block needs
    q_ranges: jax.Array   # [B * nk * 2] first and last query block a KV block needs


def _specs(rows, bk, head_dim, q_map, kv_map):
    """BlockSpecs of (q-like, kv-like, per-row scalars, q meta, kv meta)."""
    q_spec = pl.BlockSpec((1, 1, rows, head_dim), lambda b, h, *a: (b, h, q_map(b, *a), 0))
    kv_spec = pl.BlockSpec((1, 1, bk, head_dim), lambda b, h, *a: (b, h, kv_map(b, *a), 0))
    row_spec = pl.BlockSpec((1, 1, rows, 1), lambda b, h, *a: (b, h, q_map(b, *a), 0))
    q_meta = pl.BlockSpec((1, rows, 1), lambda b, h, *a: (b, q_map(b, *a), 0))
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
    head) grids of nq query blocks by nk KV blocks: blocks read once per outer block
    or once per computed pair, as the kernel's grid order has it. A model of the
    schedule (also used for JAX's bundled kernels in benchmarks/attention.py)."""
    q_block, kv_block, row_f32 = rows * head_dim * itemsize, bk * head_dim * itemsize, rows * 4
    score = rows * bk * head_dim
    if kind == "forward":    # QK^T, PV; q in and o out per query block, K and V per pair
        flops, once, per_pair = 4 * score, nq * (2 * q_block + row_f32), 2 * kv_block
    elif kind == "dkv":      # QK^T, dO V^T, P^T dO, dS^T Q; q, dO, lse, di per pair
        flops, once, per_pair = 8 * score, nk * 4 * kv_block, 2 * q_block + 2 * row_f32
    elif kind == "dq":       # QK^T, dO V^T, dS K; q, dO, dQ, lse, di per query block
        flops, once, per_pair = 6 * score, nq * (3 * q_block + 2 * row_f32), 2 * kv_block
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
            in_specs=[q_spec, kv_spec, kv_spec, q_meta, q_meta, kv_meta, kv_meta],
            out_specs=[q_spec, row_spec],
            scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32),
                            pltpu.VMEM((rows, 1), jnp.float32),
                            pltpu.VMEM((rows, dh), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(qf.shape, qf.dtype),
                   jax.ShapeDtypeStruct((b, k_heads, r, 1), jnp.float32)],
        compiler_params=_compiler_params(),
        cost_estimate=_cost("forward", qf, bk, rows, nk, pairs),
        interpret=interpret_params(interpret),
    )(plan.q_stats, plan.kv_stats, plan.kv_ranges, qf, kf, vf,
      plan.q_pos, plan.q_seg, plan.kv_pos, plan.kv_seg)


def _backward(qf, kf, vf, plan, o, lse, do, cfg):
    scale, window, rows, bk, interpret, pairs = cfg
    b, k_heads, r, dh = qf.shape
    nq, nk = r // rows, kf.shape[2] // bk
    di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    inputs = (qf, kf, vf, do, lse, di, plan.q_pos, plan.q_seg, plan.kv_pos, plan.kv_seg)

    # dK, dV: grid (b, h, kv block j, query block i), query blocks clamped per j.
    def q_block_t(b, j, i, q_stats, kv_stats, q_ranges):
        return _clamped(q_ranges, b, j, nk, i)

    def kv_block_t(b, j, i, *refs):
        return j

    q_spec, kv_spec, row_spec, q_meta, kv_meta = _specs(rows, bk, dh, q_block_t, kv_block_t)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, window=window, nq=nq, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, k_heads, nk, nq),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                      q_meta, q_meta, kv_meta, kv_meta],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, dh), jnp.float32),
                            pltpu.VMEM((bk, dh), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(kf.shape, kf.dtype),
                   jax.ShapeDtypeStruct(vf.shape, vf.dtype)],
        compiler_params=_compiler_params(),
        cost_estimate=_cost("dkv", qf, bk, rows, nk, pairs),
        interpret=interpret_params(interpret),
    )(plan.q_stats, plan.kv_stats, plan.q_ranges, *inputs)

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
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                      q_meta, q_meta, kv_meta, kv_meta],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((rows, dh), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(qf.shape, qf.dtype),
        compiler_params=_compiler_params(),
        cost_estimate=_cost("dq", qf, bk, rows, nk, pairs),
        interpret=interpret_params(interpret),
    )(plan.q_stats, plan.kv_stats, plan.kv_ranges, *inputs)
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
    rows_of = lambda x: jnp.repeat(x, groups, axis=1)[..., None]  # noqa: E731  [B, R, 1]
    plan = _Plan(rows_of(q_pos), rows_of(q_seg), kv_pos[:, None, :], kv_seg[:, None, :],
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
