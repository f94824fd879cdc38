"""The two operations that touch the whole tied vocabulary [V, D]: the embedding
lookup and the log-softmax of the output logits at chosen tokens.

On a single device they are a gather and a dense log-softmax. Under a mesh (set by
`jax.set_mesh` around the trace) the table is laid out (vocab over `tensor`, embed
over `fsdp`), and both run per device under `jax.shard_map` on their own slice of
the vocabulary, so no device gathers the table or holds a [rows, V] block: the
pieces are combined across `tensor` (a sum for the lookup; a max, then sums for
the log-sum-exp, the chosen logit and the entropy).

On one AMX CPU (`cfg.cpu_kernels == "amx"`) the log-softmax at chosen tokens runs
on AMX tiles instead (`tied_logprobs`): its [rows, V] logits never reach memory.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from grpo_jax import sharding
from grpo_jax.kernels.cpu import amx
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


def tied_applies(cfg: ModelConfig, return_entropy: bool) -> bool:
    """Whether `tied_logprobs` computes this model's log-probs: the AMX kernels are
    on (bfloat16, one device: `load.cpu_kernels`), no mesh, no entropy asked, and
    the vocabulary and width are whole tiles."""
    return (cfg.cpu_kernels == "amx" and not return_entropy
            and sharding.active_mesh() is None and cfg.vocab_size % amx.BLOCK == 0
            and cfg.embed_dim % amx.BLOCK == 0)


def _row_chunks(x: jax.Array, rows: int) -> jax.Array:
    """x [N, ...] zero-padded to whole chunks of `rows` rounded up to whole tiles ->
    [chunks, rows, ...]."""
    if rows < 1:
        raise ValueError(f"rows={rows} must be positive")
    rows = -(-rows // amx.BLOCK) * amx.BLOCK
    pad = -x.shape[0] % rows
    x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    return x.reshape(-1, rows, *x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def tied_logprobs(hidden: jax.Array, targets: jax.Array, embed: jax.Array,
                  temperature: float, rows: int) -> jax.Array:
    """log softmax(hidden @ embed.T / temperature) at targets -> [N] float32, for
    hidden [N, D], targets [N], embed [V, D], on AMX tiles ~`rows` hidden rows at a
    time (rounded up to whole tiles): the forward keeps each row's log-sum-exp
    (`amx.logsumexp`), the backward recomputes the softmax block by block
    (`amx.softmax_rows`), so neither holds [rows, V] logits in memory. bfloat16
    products summed in float32, as the XLA path's."""
    return _tied_forward(hidden, targets, embed, temperature, rows)[0]


def _tied_forward(hidden, targets, embed, temperature, rows):
    n = hidden.shape[0]
    x = hidden.astype(jnp.bfloat16)
    lse = jax.lax.map(lambda c: amx.logsumexp(c, embed, 1.0 / temperature),
                      _row_chunks(x, rows)).reshape(-1)[:n]
    chosen = amx.gather_rows(embed, targets)
    picked = jnp.einsum("nd,nd->n", x, chosen, preferred_element_type=jnp.float32)
    return picked / temperature - lse, (hidden, targets, embed, lse, chosen)


def _tied_backward(temperature, rows, residuals, g):
    hidden, targets, embed, lse, chosen = residuals
    n, dim = hidden.shape
    x = hidden.astype(jnp.bfloat16)
    scale = 1.0 / temperature
    # d logp[m] / d hidden[m] = scale * (embed[target] - sum_v p[m, v] embed[v]).
    weighted = jax.lax.map(lambda a: amx.softmax_rows(a[0], embed, a[1], scale),
                           (_row_chunks(x, rows), _row_chunks(lse, rows)))
    weighted = weighted.reshape(-1, dim)[:n]
    d_hidden = (g * scale)[:, None] * (chosen.astype(jnp.float32) - weighted)

    # The embedding's gradient, in XLA chunk by chunk: the frozen base never asks for
    # it, so XLA drops this; it is here so that the rule is whole.
    def embed_grad(total, a):
        xc, t, l, gc = a
        logits = jnp.einsum("md,vd->mv", xc, embed, preferred_element_type=jnp.float32)
        p = jnp.exp(logits * scale - l[:, None])
        d_logits = (gc * scale)[:, None] * (jax.nn.one_hot(t, embed.shape[0]) - p)
        return total + jnp.einsum("mv,md->vd", d_logits, xc.astype(jnp.float32)), None

    d_embed, _ = jax.lax.scan(embed_grad, jnp.zeros(embed.shape, jnp.float32),
                              tuple(_row_chunks(a, rows) for a in (x, targets, lse, g)))
    return d_hidden.astype(hidden.dtype), None, d_embed.astype(embed.dtype)


tied_logprobs.defvjp(_tied_forward, _tied_backward)
