"""Online softmax over key blocks, shared by the flash and decode kernels: the row
max m, row sum l and output accumulator live in VMEM scratch across the grid's
sequential key axis (all float32)."""
from __future__ import annotations

import jax.numpy as jnp

MASKED = -1e30


def start(m_sc, l_sc, acc_sc) -> None:
    m_sc[...] = jnp.full(m_sc.shape, MASKED, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)


def accumulate(s, mask, v, m_sc, l_sc, acc_sc) -> None:
    """Fold one block of scores s [rows, blk] (float32, scaled; False in `mask` takes
    no part) and its values v [blk, Dh] into the running softmax."""
    s = jnp.where(mask, s, MASKED)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
    acc_sc[...] = alpha * acc_sc[...] + jnp.dot(p.astype(v.dtype), v,
                                                preferred_element_type=jnp.float32)
    m_sc[...] = m_new


def finish(l_sc, acc_sc):
    """(output [rows, Dh] float32, row sums [rows, 1]); a row that saw nothing is 0."""
    l = l_sc[...]
    return acc_sc[...] / jnp.where(l > 0, l, 1.0), l
