"""Plain-JAX attention: the XLA implementation of the contract, and the reference the
Pallas kernels are tested against. The dense mask is built here and nowhere else.

Shapes: q [B, T, H, Dh], k/v [B, S, K, Dh] with H a multiple of K (grouped-query
attention: query head h uses KV head h // (H / K)). Scores and softmax run in
float32 whatever the input dtype; the output has q's dtype. A query that may attend
to nothing (padding) gets zeros.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from grpo_jax.kernels.layout import Layout, visible

# Large negative instead of -inf: a fully masked row then stays finite (its output
# is zeroed below, like the kernels').
_MASKED = -1e30


def dense_mask(layout: Layout, window: int | None) -> jax.Array:
    """[B, T, S] bool from positions and segments (`kernels.layout.visible`)."""
    return visible(layout.q_positions[:, :, None], layout.q_segments[:, :, None],
                   layout.kv_positions[:, None, :], layout.kv_segments[:, None, :], window)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     *, scale: float) -> jax.Array:
    """Attention under a dense mask [B, T, S] (True = may attend)."""
    batch, q_len, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    groups = num_heads // num_kv
    q = q.reshape(batch, q_len, num_kv, groups, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    out = out.astype(v.dtype).reshape(batch, q_len, num_heads, head_dim)
    # A query that sees nothing averaged every key uniformly: zero it (on the output,
    # not the scores, which would cost a pass over [B, H, T, S]).
    return jnp.where(jnp.any(mask, axis=-1)[:, :, None, None], out, jnp.zeros((), out.dtype))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: Layout, *, scale: float,
              window: int | None = None) -> jax.Array:
    """Dense attention over the whole row, masked by `layout`."""
    return masked_attention(q, k, v, dense_mask(layout, window), scale=scale)


def prefix_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: Layout, *,
                     scale: float, window: int | None = None) -> jax.Array:
    """Self-attention over rows [prompt P | G completions] (`layout.shared_prefix`),
    without scores between completions that never meet.

    The prompt attends to itself; each completion to the prompt and itself, as its
    own row [B*G, C] over keys [prompt; completion] with the prompt's keys and values
    broadcast to it: the prompt's K/V gradients sum over the G completions through
    the broadcast. The same outputs as `attention` on the packed row.
    """
    prefix_len, group = layout.shared_prefix
    b, t = q.shape[:2]
    steps = (t - prefix_len) // group

    def split(x):
        """[B, T, ...] -> the prompt [B, P, ...] and per completion [prompt; completion]
        [B*G, P + C, ...]."""
        prefix, rest = x[:, :prefix_len], x[:, prefix_len:]
        rest = rest.reshape(b, group, steps, *x.shape[2:])
        shared = jnp.broadcast_to(prefix[:, None], (b, group, *prefix.shape[1:]))
        both = jnp.concatenate([shared, rest], axis=2)
        return prefix, both.reshape(b * group, prefix_len + steps, *x.shape[2:])

    (pos_p, pos_b), (seg_p, seg_b) = split(layout.q_positions), split(layout.q_segments)
    prefix_mask = dense_mask(Layout(pos_p, seg_p, pos_p, seg_p), window)
    branch_mask = dense_mask(Layout(pos_b[:, prefix_len:], seg_b[:, prefix_len:], pos_b, seg_b),
                             window)
    (k_p, k_b), (v_p, v_b) = split(k), split(v)
    out_prefix = masked_attention(q[:, :prefix_len], k_p, v_p, prefix_mask, scale=scale)
    q_branch = q[:, prefix_len:].reshape(b * group, steps, *q.shape[2:])
    out_branch = masked_attention(q_branch, k_b, v_b, branch_mask, scale=scale)
    out_branch = out_branch.reshape(b, group * steps, *out_branch.shape[2:])
    return jnp.concatenate([out_prefix, out_branch], axis=1)


def cache_mask(positions: jax.Array, size: int, window: int | None) -> jax.Array:
    """[B, S] bool: the slots of a cache of `size` slots (slot = position mod size, a
    ring buffer when size < the sequence) that a query at positions[b] may attend,
    itself included. Slot s holds position q - ((q - s) mod size); negative: never
    written."""
    q = positions[:, None]
    slot = jnp.arange(size)[None, :]
    held = q - (q - slot) % size
    mask = held >= 0
    if window is not None:
        mask &= q - held < window
    return mask


def decode_attention(q: jax.Array, keys: jax.Array, values: jax.Array, positions: jax.Array,
                     *, scale: float, window: int | None = None) -> jax.Array:
    """One new token per row, at positions[b], against a KV cache that holds it already.

    q [B, H, Dh]; keys [B, K, Dh, S] (stored transposed, so q @ keys is a plain
    matmul per row: on XLA:CPU twice as fast as contracting the minor axes);
    values [B, K, S, Dh]. Returns [B, H, Dh].
    """
    batch, num_heads, head_dim = q.shape
    num_kv = keys.shape[1]
    mask = cache_mask(positions, keys.shape[-1], window)
    q = q.reshape(batch, num_kv, num_heads // num_kv, head_dim)
    scores = jnp.einsum("bkgd,bkds->bkgs", q, keys, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    # Summed in float32: a bfloat16 result made XLA:CPU convert the whole value cache
    # to float32 at every step (~18 of a 64-row step's ~200 ms on an AMX machine).
    out = jnp.einsum("bkgs,bksd->bkgd", probs, values, preferred_element_type=jnp.float32)
    return out.astype(values.dtype).reshape(batch, num_heads, head_dim)
