"""Gemma 3 decoder as pure functions over a params pytree.

The parameter tree is described once, in `param_specs`: each leaf's shape and
logical axes. `init_params`, `abstract_params`, `logical_axes` and the loaders'
shape checks all derive from that one description.

Canonical layout (D embed, H query heads, K kv heads, Dh head dim, F ffw, V vocab):
    embed                      [V, D]        (vocab, embed)
    final_norm                 [D]           (embed,)
    layers[i].pre_attn_norm    [D]           and post_attn_norm, pre_ffw_norm, post_ffw_norm
    layers[i].attn.q           [D, H, Dh]    (embed, q_heads, head_dim)
    layers[i].attn.k / .v      [D, K, Dh]    (embed, kv_heads, head_dim)
    layers[i].attn.o           [H, Dh, D]    (q_heads, head_dim, embed)
    layers[i].attn.q_norm/k_norm [Dh]        (head_dim,)
    layers[i].mlp.gate / .up   [D, F]        (embed, ffw)
    layers[i].mlp.down         [F, D]        (ffw, embed)
Norm scales use Gemma's (1 + scale) convention: a zero scale is the identity.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from grpo_jax import sharding
from grpo_jax.model.config import ModelConfig
from grpo_jax.model import attention, vocab_parallel
from grpo_jax.model.matmul import matmul
from grpo_jax.kernels.cpu import amx
from grpo_jax.kernels.layout import Layout, packed_layout, segment_layout, self_layout

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    logical_axes: tuple[str, ...]
    # Standard deviation of the random init (None: zeros, for norm scales).
    init_std: float | None


def param_specs(cfg: ModelConfig) -> Params:
    """The one description of every weight: shapes and logical axes."""
    d, h, k, dh, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffw_dim
    norm = lambda n, axis: ParamSpec((n,), (axis,), None)  # noqa: E731
    dense = lambda shape, axes, fan_in: ParamSpec(shape, axes, fan_in ** -0.5)  # noqa: E731

    def layer():
        return {
            "pre_attn_norm": norm(d, "embed"),
            "post_attn_norm": norm(d, "embed"),
            "pre_ffw_norm": norm(d, "embed"),
            "post_ffw_norm": norm(d, "embed"),
            "attn": {
                "q": dense((d, h, dh), ("embed", "q_heads", "head_dim"), d),
                "k": dense((d, k, dh), ("embed", "kv_heads", "head_dim"), d),
                "v": dense((d, k, dh), ("embed", "kv_heads", "head_dim"), d),
                "o": dense((h, dh, d), ("q_heads", "head_dim", "embed"), h * dh),
                "q_norm": norm(dh, "head_dim"),
                "k_norm": norm(dh, "head_dim"),
            },
            "mlp": {
                "gate": dense((d, f), ("embed", "ffw"), d),
                "up": dense((d, f), ("embed", "ffw"), d),
                "down": dense((f, d), ("ffw", "embed"), f),
            },
        }

    return {
        "embed": ParamSpec((cfg.vocab_size, d), ("vocab", "embed"), 1.0),
        "final_norm": norm(d, "embed"),
        "layers": [layer() for _ in range(cfg.num_layers)],
    }


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def abstract_params(cfg: ModelConfig) -> Params:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, cfg.weight_dtype),
                        param_specs(cfg), is_leaf=_is_spec)


def logical_axes(cfg: ModelConfig) -> Params:
    return jax.tree.map(lambda s: s.logical_axes, param_specs(cfg), is_leaf=_is_spec)


def param_shardings(plan: sharding.MeshPlan, cfg: ModelConfig) -> Params:
    """Where each weight lives on the plan's mesh, from its logical axes."""
    return sharding.tree_shardings(plan, logical_axes(cfg))


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random weights (for tests and tiny runs); norms random too so they matter."""
    specs, treedef = jax.tree.flatten(param_specs(cfg), is_leaf=_is_spec)
    keys = jax.random.split(key, len(specs))

    def one(spec, k):
        std = 0.1 if spec.init_std is None else spec.init_std
        return (std * jax.random.normal(k, spec.shape, jnp.float32)).astype(cfg.weight_dtype)

    return jax.tree.unflatten(treedef, [one(s, k) for s, k in zip(specs, keys)])


# ---------------------------------------------------------------------------
# Forward pass


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) * (1 + scale), computed in float32."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float, scale: float) -> jax.Array:
    """Rotary embedding on the two halves of the head dim. x [B, T, N, Dh], positions [B, T]."""
    head_dim = x.shape[-1]
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim))
    angles = (positions.astype(jnp.float32) / scale)[..., None] * inv_freq  # [B, T, half]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def embed_tokens(params: Params, tokens: jax.Array, cfg: ModelConfig,
                 lookup=vocab_parallel.lookup) -> jax.Array:
    """Scaled embeddings of tokens; `lookup(table, tokens)` reads the rows."""
    dtype = cfg.compute_dtype
    x = sharding.constrain(lookup(params["embed"], tokens))
    return x.astype(dtype) * jnp.asarray(math.sqrt(cfg.embed_dim), dtype)


def _lora_equations(eq: str) -> tuple[str, str]:
    """Split a projection "x,w->y" into LoRA's two einsums x,a->low and low,b->y.

    a holds w's contracted (input) axes then the rank r; b holds r then w's output axes.
    """
    inputs, out = eq.split("->")
    x_spec, w_spec = inputs.split(",")
    contracted = "".join(c for c in w_spec if c in x_spec)
    produced = "".join(c for c in w_spec if c not in x_spec)
    kept = "".join(c for c in x_spec if c not in w_spec)
    return f"{x_spec},{contracted}r->{kept}r", f"{kept}r,r{produced}->{out}"


# The einsum of each projection, shared by the forward pass and LoRA's merge.
PROJECTIONS = {
    ("attn", "q"): "btd,dhk->bthk",
    ("attn", "k"): "btd,dhk->bthk",
    ("attn", "v"): "btd,dhk->bthk",
    ("attn", "o"): "bthk,hkd->btd",
    ("mlp", "gate"): "btd,df->btf",
    ("mlp", "up"): "btd,df->btf",
    ("mlp", "down"): "btf,fd->btd",
}


def pack_projections(params: Params) -> Params:
    """params with each layer's projection weights packed for AMX tiles
    (`amx.PackedWeight`), for a decode loop: a step's few rows then read each weight
    once, as stored, instead of XLA re-laying it out at every step. A weight whose
    sizes are not multiples of the tile block stays as it is. Inference only."""
    def pack_layer(lp):
        lp = dict(lp)
        for (block, name), eq in PROJECTIONS.items():
            w = lp[block][name]
            if amx.packable(eq, tuple(w.shape)):
                lp[block] = dict(lp[block], **{name: amx.pack(eq, w)})
        return lp
    return dict(params, layers=[pack_layer(lp) for lp in params["layers"]])


def project(x: jax.Array, p: Params, block: str, name: str, cfg: ModelConfig,
            lora=None, layer: int = 0) -> jax.Array:
    """x @ p[name], plus LoRA's low-rank path scale * (x @ a) @ b when it targets it.

    The adapter stays unmerged: its gradients then cost rank-sized matmuls, not a
    dense weight gradient.
    """
    dtype = cfg.compute_dtype
    eq = PROJECTIONS[(block, name)]
    impl = cfg.matmul_impl
    y = matmul(eq, x, p[name], dtype, impl=impl)
    adapter = None if lora is None else lora.layers[layer].get(block, {}).get(name)
    if adapter is not None:
        eq_a, eq_b = _lora_equations(eq)
        low = matmul(eq_a, x, adapter["a"], dtype, impl=impl)
        y = y + matmul(eq_b, low, adapter["b"], dtype, impl=impl) * jnp.asarray(lora.scale, dtype)
    return y


def layer_window(cfg: ModelConfig, layer: int) -> int | None:
    """The sliding window of a local layer; None for a global one."""
    return None if cfg.is_global_layer(layer) else cfg.sliding_window


def qkv(p: Params, x: jax.Array, positions: jax.Array, cfg: ModelConfig, layer: int,
        lora=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normed, rotated queries [B,T,H,Dh]; keys and values [B,T,K,Dh]."""
    q = project(x, p, "attn", "q", cfg, lora, layer)
    k = project(x, p, "attn", "k", cfg, lora, layer)
    v = project(x, p, "attn", "v", cfg, lora, layer)
    q = rms_norm(q, p["q_norm"], cfg.rms_eps)
    k = rms_norm(k, p["k_norm"], cfg.rms_eps)
    is_global = cfg.is_global_layer(layer)
    base = cfg.rope_base_global if is_global else cfg.rope_base_local
    scale = cfg.rope_scale_global if is_global else 1.0
    return (apply_rope(q, positions, base=base, scale=scale),
            apply_rope(k, positions, base=base, scale=scale), v)


def _mlp_block(p: Params, x: jax.Array, cfg: ModelConfig, lora, layer: int) -> jax.Array:
    gate = project(x, p, "mlp", "gate", cfg, lora, layer)
    up = project(x, p, "mlp", "up", cfg, lora, layer)
    return project(jax.nn.gelu(gate, approximate=True) * up, p, "mlp", "down", cfg, lora, layer)


def decoder_layer(lp: Params, x: jax.Array, positions: jax.Array, cfg: ModelConfig,
                  layer: int, attend, lora=None) -> tuple[jax.Array, Any]:
    """One layer: pre/post-normed attention, then pre/post-normed gated MLP.

    `attend(q, k, v) -> (out, aux)` is the attention itself, so the plain forward
    and the KV-cached sampler share everything else; aux (the updated cache, say)
    is handed back.
    """
    h = rms_norm(x, lp["pre_attn_norm"], cfg.rms_eps)
    q, k, v = qkv(lp["attn"], h, positions, cfg, layer, lora)
    out, aux = attend(q, k, v)
    h = project(out, lp["attn"], "attn", "o", cfg, lora, layer)
    x = x + rms_norm(h, lp["post_attn_norm"], cfg.rms_eps)
    h = _mlp_block(lp["mlp"], rms_norm(x, lp["pre_ffw_norm"], cfg.rms_eps), cfg, lora, layer)
    return x + rms_norm(h, lp["post_ffw_norm"], cfg.rms_eps), aux


def attention_scale(cfg: ModelConfig) -> float:
    return cfg.query_pre_attn_scalar ** -0.5


def decoder_stack(params: Params, x: jax.Array, positions: jax.Array, cfg: ModelConfig,
                  attend, lora=None) -> tuple[jax.Array, list]:
    """The one layer loop, for the forward, the packed forward, prefill and decode.

    `attend(layer, q, k, v) -> (out, aux)` is the attention of each layer (over the
    sequence, or against a KV cache it updates); the auxes come back per layer.
    Under a mesh the rows stay over data x fsdp between layers (`sharding.constrain`).
    """
    auxes = []
    for i, lp in enumerate(params["layers"]):
        x, aux = decoder_layer(lp, x, positions, cfg, i, functools.partial(attend, i), lora)
        x = sharding.constrain(x)
        auxes.append(aux)
    return x, auxes


def sequence_attend(layout: Layout, cfg: ModelConfig):
    """`attend` for attention over the sequence itself, by `layout`."""
    def attend(layer, q, k, v):
        return attention.self_attention(q, k, v, layout, cfg, scale=attention_scale(cfg),
                                        window=layer_window(cfg, layer)), None
    return attend


def hidden_states(params: Params, tokens: jax.Array, positions: jax.Array,
                  input_mask: jax.Array, cfg: ModelConfig, lora=None,
                  shared_prefix: tuple[int, int] | None = None,
                  segments: jax.Array | None = None) -> jax.Array:
    """Final-normed hidden states [B, T, D] for tokens [B, T].

    positions [B, T] int: each token's position in its own sequence (left padding
    does not count). input_mask [B, T] bool: False marks padding, which no token
    attends to. lora: optional `LoraWeights` (grpo_jax.model.lora); None is the base.
    shared_prefix (P, G): each row is a prefix of P tokens then G continuations of
    (T - P) / G tokens, each seeing the prefix and itself only
    (`kernels.layout.packed_layout`). segments [B, T]: each row holds several
    sequences end to end, each token seeing its own sequence only
    (`kernels.layout.segment_layout`; input_mask is then unused).
    """
    if segments is not None:
        layout = segment_layout(positions, segments)
    elif shared_prefix is not None:
        layout = packed_layout(positions, input_mask, *shared_prefix)
    else:
        layout = self_layout(positions, input_mask)
    x, _ = decoder_stack(params, embed_tokens(params, tokens, cfg), positions, cfg,
                         sequence_attend(layout, cfg), lora)
    return rms_norm(x, params["final_norm"], cfg.rms_eps)


def logits_from_hidden(params: Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Tied output projection: hidden [..., D] -> float32 logits [..., V]."""
    return matmul("...d,vd->...v", hidden, params["embed"], cfg.compute_dtype, jnp.float32,
                  impl=cfg.matmul_impl)


def forward(params: Params, tokens: jax.Array, positions: jax.Array, input_mask: jax.Array,
            cfg: ModelConfig, lora=None) -> jax.Array:
    """Float32 logits [B, T, V]. Materialises the full vocabulary: use
    `hidden_states` + `logits_from_hidden` on a slice when only some positions matter."""
    hidden = hidden_states(params, tokens, positions, input_mask, cfg, lora)
    return logits_from_hidden(params, hidden, cfg)


def left_padded_positions(input_mask: jax.Array) -> jax.Array:
    """Per-row positions for a left-padded batch: 0 at each row's first real token."""
    return jnp.maximum(jnp.cumsum(input_mask.astype(jnp.int32), axis=-1) - 1, 0)
