"""Plain-JAX attention: the one function a Pallas kernel replaces.

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
