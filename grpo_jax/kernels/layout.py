"""Who may attend to whom: the one rule every attention implementation follows.

A sequence is described by per-token positions and segment ids, never by a dense
mask (only `kernels.reference` builds one, to check the kernels against):

- segment 0 (`PAD`) is padding: it attends to nothing and nothing attends to it;
- segment 1 (`SHARED`) is visible to every segment (a prompt shared by the
  completions packed after it, or simply every real token of an unpacked row);
- other segments see `SHARED` and themselves only (the completions of one prompt
  never see each other);
- within what the segments allow, a query at position p sees keys at positions
  p - window < position <= p (window None: all earlier positions).

Positions are each token's own position in its sequence (left padding does not
count), so left-padded rows, packed shared prompts, sliding windows and causality
all follow from these four arrays.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

PAD = 0
SHARED = 1


def visible(q_pos, q_seg, kv_pos, kv_seg, window: int | None):
    """Elementwise: may a query (q_pos, q_seg) attend a key (kv_pos, kv_seg)?
    The arguments broadcast against each other (e.g. [..., T, 1] and [..., 1, S])."""
    diff = q_pos - kv_pos
    ok = (diff >= 0) & (q_seg != PAD) & (kv_seg != PAD) & ((kv_seg == q_seg) | (kv_seg == SHARED))
    if window is not None:
        ok &= diff < window
    return ok


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Layout:
    """Positions and segment ids of the queries [B, T] and keys [B, S] (int32).

    `shared_prefix` (P, G), static, says the rows are [prompt of P | G completions of
    (T - P) / G tokens] with segments to match (`packed_layout`): the XLA path then
    attends per completion instead of over the whole packed row.
    """
    q_positions: jax.Array
    q_segments: jax.Array
    kv_positions: jax.Array
    kv_segments: jax.Array
    shared_prefix: tuple[int, int] | None = dataclasses.field(
        default=None, metadata=dict(static=True))


def self_layout(positions: jax.Array, valid: jax.Array) -> Layout:
    """Self-attention over rows [B, T]: real tokens are SHARED, padding PAD."""
    segments = jnp.where(valid, SHARED, PAD).astype(jnp.int32)
    positions = positions.astype(jnp.int32)
    return Layout(positions, segments, positions, segments)


def segment_layout(positions: jax.Array, segments: jax.Array) -> Layout:
    """Rows [B, T] of several sequences packed end to end (SFT): `segments` gives each
    token's sequence (ids >= 2, so none is SHARED; PAD for padding) and `positions`
    restart at 0 with each sequence, so a token sees only its own sequence's past."""
    positions, segments = positions.astype(jnp.int32), segments.astype(jnp.int32)
    return Layout(positions, segments, positions, segments)


def packed_layout(positions: jax.Array, valid: jax.Array, prefix_len: int,
                  group: int) -> Layout:
    """Rows [prompt of P | completion 1 | ... | completion G]: the prompt SHARED,
    completion g its own segment 2 + g, padding PAD."""
    steps = (positions.shape[1] - prefix_len) // group
    if prefix_len + group * steps != positions.shape[1]:
        raise ValueError(f"packed rows of length {positions.shape[1]} are not a prefix of "
                         f"{prefix_len} plus {group} equal completions")
    ids = jnp.concatenate([jnp.full((prefix_len,), SHARED, jnp.int32),
                           jnp.repeat(2 + jnp.arange(group, dtype=jnp.int32), steps)])
    segments = jnp.where(valid, ids[None, :], PAD).astype(jnp.int32)
    positions = positions.astype(jnp.int32)
    return Layout(positions, segments, positions, segments, (prefix_len, group))
