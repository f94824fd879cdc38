"""Plain-JAX attention: the functions a Pallas kernel replaces (`attention` for
prefill and training, `decode_attention` for one token against a KV cache).

Shapes: q [B, T, H, Dh], k/v [B, S, K, Dh] with H a multiple of K (grouped-query
attention), mask [B, T, S] bool (True = may attend). Scores and softmax run in
float32 whatever the input dtype; the output has q's dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Large negative instead of -inf: a fully masked row (a padding query) then gives
# a finite uniform average instead of NaN, and its output is ignored anyway.
_MASKED = -1e30


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
              *, scale: float) -> jax.Array:
    batch, q_len, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    groups = num_heads // num_kv
    q = q.reshape(batch, q_len, num_kv, groups, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, q_len, num_heads, head_dim)


def decode_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array,
                     *, scale: float) -> jax.Array:
    """One new token per row against a KV cache.

    q [B, H, Dh]; keys [B, K, Dh, S] (stored transposed, so q @ keys is a plain
    matmul per row: on XLA:CPU twice as fast as contracting the minor axes);
    values [B, K, S, Dh]; mask [B, S] bool. Returns [B, H, Dh].
    """
    batch, num_heads, head_dim = q.shape
    num_kv = keys.shape[1]
    q = q.reshape(batch, num_kv, num_heads // num_kv, head_dim)
    scores = jnp.einsum("bkgd,bkds->bkgs", q, keys, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgs,bksd->bkgd", probs, values)
    return out.reshape(batch, num_heads, head_dim)
