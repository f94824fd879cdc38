"""The model's attention: the `kernels` contract, run by the implementation that
`ModelConfig.attention_impl` names.

- "xla": `kernels.reference` (dense masked einsums; packed shared prompts attend per
  completion, so no score is spent between completions that never meet).
- "pallas": `kernels.flash_attention` for the forward, backward and prefill,
  `kernels.decode_attention` for the sampler's steps. Under a mesh they run per
  device under `jax.shard_map`: rows over data x fsdp, and the query heads over
  `tensor` when there is one KV head (each device keeps the whole KV head, so its
  query heads still share it); a Pallas kernel cannot be partitioned by the compiler.
  (`check_vma=False`: a pallas_call's outputs carry no record of which mesh axes they
  vary over.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from grpo_jax import sharding
from grpo_jax.model.config import ModelConfig
from grpo_jax.kernels import reference
from grpo_jax.kernels.decode_attention import decode_attention as pallas_decode
from grpo_jax.kernels.flash_attention import flash_attention
from grpo_jax.kernels.layout import Layout


def _axes(num_kv: int):
    """Under the active mesh: the mesh axes of the rows, and of the query heads (over
    `tensor` when one KV head serves them all, so each device keeps it whole)."""
    rows = sharding.logical_spec(("batch",))[0]
    heads = sharding.logical_spec(("q_heads",))[0] if num_kv == 1 else None
    return rows, heads


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: Layout, cfg: ModelConfig,
                   *, scale: float, window: int | None) -> jax.Array:
    """q [B, T, H, Dh] over k/v [B, S, K, Dh] by `layout`; [B, T, H, Dh]."""
    if cfg.attention_impl == "xla":
        attend = reference.prefix_attention if layout.shared_prefix else reference.attention
        return attend(q, k, v, layout, scale=scale, window=window)

    def local(q, k, v, layout):
        return flash_attention(q, k, v, layout, scale=scale, window=window)

    rows, heads = _axes(k.shape[2])
    q_spec, kv_spec = P(rows, None, heads, None), P(rows, None, None, None)
    layout_spec = jax.tree.map(lambda _: P(rows, None), layout)
    return sharding.per_device(local, (q_spec, kv_spec, kv_spec, layout_spec), q_spec,
                               check_vma=False)(q, k, v, layout)


def cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array, positions: jax.Array,
                     cfg: ModelConfig, *, scale: float, window: int | None) -> jax.Array:
    """One query per row, q [B, H, Dh] at positions [B], against a KV cache (keys
    [B, K, Dh, S], values [B, K, S, Dh]) that already holds it; [B, H, Dh]."""
    if cfg.attention_impl == "xla":
        return reference.decode_attention(q, keys, values, positions, scale=scale,
                                          window=window)
    size = keys.shape[-1]
    if window is not None and size > window:
        raise ValueError(f"a window layer's cache of {size} slots is longer than its window "
                         f"{window}: decode attention reads every slot it holds")
    # Slots [0, min(position + 1, S)) are exactly the visible ones (kernels/decode_attention).
    kv_lengths = jnp.minimum(positions + 1, size).astype(jnp.int32)

    def local(q, keys, values, kv_lengths):
        return pallas_decode(q, keys, values, kv_lengths, scale=scale)

    rows, heads = _axes(keys.shape[1])
    q_spec, cache_spec = P(rows, heads, None), P(rows, None, None, None)
    return sharding.per_device(local, (q_spec, cache_spec, cache_spec, P(rows)), q_spec,
                               check_vma=False)(q, keys, values, kv_lengths)
