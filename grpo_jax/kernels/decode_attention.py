"""Pallas TPU decode attention: one new query per row against its KV cache.

The cache is the sampler's (`grpo_jax.model.kv_cache`): keys [B, K, Dh, S] (stored
transposed), values [B, K, S, Dh]; slot = position mod S, a ring buffer on
sliding-window layers (S = the window) and the whole sequence on global ones.
Either way the slots a query may attend form a prefix of the buffer: the first
`kv_lengths[b]` = min(position + 1, S) slots (a ring buffer holds exactly the last S
positions once full, all inside the window). So each row's valid range is one
number, scalar-prefetched to SMEM: KV blocks past it are neither computed nor
copied (the index map clamps to the row's last valid block).

Grid (row, KV head, KV block): the G = H / K query heads of a KV head are the rows
of one [G, Dh] x [Dh, block] matmul, the KV head read once for all of them; online
softmax over the KV blocks. A block that overruns S (S not a multiple of the block)
is masked by slot, values included, so whatever lies past the end cannot leak in.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from grpo_jax.kernels import online_softmax
from grpo_jax.kernels.target import interpret_params


def _decode_kernel(kv_lengths, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc, *,
                   scale, block, num_blocks):
    b, j = pl.program_id(0), pl.program_id(2)
    n = kv_lengths[b]

    @pl.when(j == 0)
    def _init():
        online_softmax.start(m_sc, l_sc, acc_sc)

    @pl.when(j * block < n)
    def _step():
        q = q_ref[0, 0]                      # [G, Dh]
        s = jnp.dot(q, k_ref[0, 0], preferred_element_type=jnp.float32) * scale  # [G, blk]
        start = j * block
        mask = start + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1) < n
        v_ok = start + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0) < n
        v = jnp.where(v_ok, v_ref[0, 0], jnp.zeros((), v_ref.dtype))  # [blk, Dh]
        online_softmax.accumulate(s, mask, v, m_sc, l_sc, acc_sc)

    @pl.when(j == num_blocks - 1)
    def _finish():
        o_ref[0, 0] = online_softmax.finish(l_sc, acc_sc)[0].astype(o_ref.dtype)


def decode_attention(q: jax.Array, keys: jax.Array, values: jax.Array, kv_lengths: jax.Array,
                     *, scale: float, block_kv: int = 256,
                     interpret: bool | None = None) -> jax.Array:
    """q [B, H, Dh] against slots [0, kv_lengths[b]) of keys [B, K, Dh, S] and values
    [B, K, S, Dh]; returns [B, H, Dh]. block_kv should be a multiple of 128 on a TPU
    (it is cut to S when S is smaller). A row with kv_lengths 0 gets zeros."""
    batch, num_heads, head_dim = q.shape
    num_kv, size = keys.shape[1], keys.shape[-1]
    if num_heads % num_kv:
        raise ValueError(f"{num_heads} query heads do not share {num_kv} KV heads evenly")
    groups = num_heads // num_kv
    block = min(block_kv, size)
    num_blocks = -(-size // block)

    def kv_block(b, h, j, kv_lengths):
        last = jnp.maximum((kv_lengths[b] + block - 1) // block - 1, 0)
        return jnp.minimum(j, last)

    q_spec = pl.BlockSpec((1, 1, groups, head_dim), lambda b, h, j, lens: (b, h, 0, 0))
    kernel = functools.partial(_decode_kernel, scale=float(scale), block=block,
                               num_blocks=num_blocks)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(batch, num_kv, num_blocks),
            in_specs=[q_spec,
                      pl.BlockSpec((1, 1, head_dim, block),
                                   lambda b, h, j, lens: (b, h, 0, kv_block(b, h, j, lens))),
                      pl.BlockSpec((1, 1, block, head_dim),
                                   lambda b, h, j, lens: (b, h, kv_block(b, h, j, lens), 0))],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((groups, 1), jnp.float32),
                            pltpu.VMEM((groups, 1), jnp.float32),
                            pltpu.VMEM((groups, head_dim), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((batch, num_kv, groups, head_dim), q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        # Every slot read (a full cache: the late steps of a decode, and what XLA reads).
        cost_estimate=pl.CostEstimate(
            flops=4 * batch * num_heads * size * head_dim,
            transcendentals=batch * num_heads * size,
            bytes_accessed=(2 * batch * num_kv * size + 2 * batch * num_heads) * head_dim
            * q.dtype.itemsize),
        interpret=interpret_params(interpret),
    )(kv_lengths.astype(jnp.int32), q.reshape(batch, num_kv, groups, head_dim), keys, values)
    return out.reshape(batch, num_heads, head_dim)
