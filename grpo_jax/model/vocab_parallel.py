"""The two operations that touch the whole tied vocabulary [V, D]: the embedding
lookup and the log-softmax of the output logits at chosen tokens.

On a single device they are a gather and a dense log-softmax. Under a mesh (set by
`jax.set_mesh` around the trace) the table is laid out (vocab over `tensor`, embed
over `fsdp`), and both run per device under `jax.shard_map` on their own slice of
the vocabulary, so no device gathers the table or holds a [rows, V] block: the
pieces are combined across `tensor` (a sum for the lookup; a max, then sums for
the log-sum-exp, the chosen logit and the entropy).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from grpo_jax import sharding
from grpo_jax.model.config import ModelConfig
from grpo_jax.model.matmul import matmul


def _local_ids(ids: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """Token ids -> (index into this device's vocabulary slice of `size` rows, whether
    the token lies in that slice)."""
    ids = ids - jax.lax.axis_index("tensor") * size
    here = (ids >= 0) & (ids < size)
    return jnp.clip(ids, 0, size - 1), here


def lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """table[tokens] for an embedding [V, D]. Under a mesh each device looks up the
    tokens of its data rows in its own [V / tensor, D / fsdp] block (zeros for tokens
    outside its vocab slice), the slices are summed over `tensor`, and the result
    comes out as rows over data with the embedding over fsdp (the caller's
    `sharding.constrain` moves it to rows over data x fsdp)."""
    if sharding.active_mesh() is None:
        return jnp.take(table, tokens, axis=0)

    def local(block, ids):
        ids, here = _local_ids(ids, block.shape[0])
        rows = jnp.take(block, ids, axis=0)
        return jax.lax.psum(jnp.where(here[..., None], rows, 0), "tensor")

    spare = (None,) * (tokens.ndim - 1)
    return jax.shard_map(local, in_specs=(P("tensor", "fsdp"), P("data", *spare)),
                         out_specs=P("data", *spare, "fsdp"))(table, tokens)


def _logsumexp(logits: jax.Array) -> jax.Array:
    """log sum exp over the last axis, the sum taken as a matrix-vector product: XLA:CPU
    fuses exp into its reduction there and runs it at ~0.4 G elements/s (170 ms for a
    256-row chunk of the 270M's logits on an AMX machine); the exponentials on their
    own, then the product, take ~60."""
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    sums = jnp.einsum("...v,v->...", jnp.exp(logits - top),
                      jnp.ones(logits.shape[-1:], logits.dtype))
    return jnp.log(sums) + top[..., 0]


def chosen_logprobs(logits: jax.Array, targets: jax.Array, temperature: float,
                    return_entropy: bool) -> tuple[jax.Array, jax.Array]:
    """log softmax(logits / temperature) at `targets`, and the entropy of each
    position's distribution (zeros unless `return_entropy`). logits [..., V]."""
    logits = logits / temperature
    logz = _logsumexp(logits)
    logp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - logz
    if not return_entropy:
        return logp, jnp.zeros_like(logp)
    # -sum p log p on the normalised log-probs: logz - E[logits] would cancel
    # two large numbers when the logits are large and the entropy small.
    logq = logits - logz[..., None]
    return logp, -jnp.sum(jnp.exp(logq) * logq, axis=-1)


def logprobs(hidden: jax.Array, targets: jax.Array, embed: jax.Array, cfg: ModelConfig,
             temperature: float, return_entropy: bool) -> tuple[jax.Array, jax.Array]:
    """`chosen_logprobs` of the tied logits hidden @ embed.T, hidden [n, S, D] and
    targets [n, S] (rows over data x fsdp under a mesh), embed [V, D]."""
    if sharding.active_mesh() is None:
        logits = matmul("...d,vd->...v", hidden, embed, cfg.compute_dtype, jnp.float32,
                        impl=cfg.matmul_impl)
        return chosen_logprobs(logits, targets, temperature, return_entropy)

    def local(h, t, e):
        logits = matmul("nsd,vd->nsv", h, e, cfg.compute_dtype, jnp.float32) / temperature
        # The shift only steadies the exponentials; its gradient cancels.
        top = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), "tensor")
        logz = top + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1),
                                          "tensor"))
        ids, here = _local_ids(t, e.shape[0])
        picked = jnp.take_along_axis(logits, ids[..., None], axis=-1)[..., 0]
        logp = jax.lax.psum(jnp.where(here, picked, 0.0), "tensor") - logz
        if not return_entropy:
            return logp, jnp.zeros_like(logp)
        logq = logits - logz[..., None]
        return logp, -jax.lax.psum(jnp.sum(jnp.exp(logq) * logq, axis=-1), "tensor")

    rows = sharding.logical_spec(("batch",))
    return jax.shard_map(local, in_specs=(rows, rows, P("tensor", None)),
                         out_specs=(rows, rows))(hidden, targets, embed)
