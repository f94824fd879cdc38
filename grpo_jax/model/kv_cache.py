"""KV cache for Gemma 3: prefill a left-padded prompt batch, then decode a token per row.

Layout: each layer keeps keys [B, K, Dh, S] (transposed, see
`kernels.reference.decode_attention`) and values [B, K, S, Dh]. A global layer's S is the
cache length (prompt bucket + token budget); a sliding-window layer's S is
min(window, cache length), used as a ring buffer. Slots are addressed by each
row's own position (slot = position mod S), so left padding occupies no slot and
rows of different prompt lengths decode side by side with per-row write indices.

`lengths[b]` counts the tokens row b has written, which is also the position of
its next token. The slot -> position map needs no storage: slot s of a layer of
size S holds position q - ((q - s) mod S) for the latest position q, or nothing
when that is negative.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from grpo_jax import sharding
from grpo_jax.model.config import ModelConfig
from grpo_jax.model import attention, gemma3, vocab_parallel
from grpo_jax.kernels.cpu import amx
from grpo_jax.kernels.layout import self_layout


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    keys: list[jax.Array]     # per layer [B, K, Dh, S_layer]
    values: list[jax.Array]   # per layer [B, K, S_layer, Dh]
    lengths: jax.Array        # [B] int32: tokens written = position of the next token


def layer_cache_size(cfg: ModelConfig, layer: int, cache_len: int) -> int:
    window = gemma3.layer_window(cfg, layer)
    return cache_len if window is None else min(window, cache_len)


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    shape: tuple[int, ...]
    logical_axes: tuple[str, ...]
    dtype: jnp.dtype


def cache_specs(cfg: ModelConfig, batch: int, cache_len: int) -> KVCache:
    """The one description of the cache: each buffer's shape, logical axes and dtype.
    Rows are the sharded axis; the single KV head, head dim and slots stay whole."""
    k, dh, dtype = cfg.num_kv_heads, cfg.head_dim, cfg.compute_dtype
    sizes = [layer_cache_size(cfg, i, cache_len) for i in range(cfg.num_layers)]
    return KVCache(
        [CacheSpec((batch, k, dh, s), ("batch", "kv_heads", "head_dim", "length"), dtype)
         for s in sizes],
        [CacheSpec((batch, k, s, dh), ("batch", "kv_heads", "length", "head_dim"), dtype)
         for s in sizes],
        CacheSpec((batch,), ("batch",), jnp.dtype(jnp.int32)))


def _from_specs(fn, specs: KVCache):
    return jax.tree.map(fn, specs, is_leaf=lambda x: isinstance(x, CacheSpec))


def init_cache(cfg: ModelConfig, batch: int, cache_len: int) -> KVCache:
    return _from_specs(lambda s: jnp.zeros(s.shape, s.dtype), cache_specs(cfg, batch, cache_len))


def abstract_cache(cfg: ModelConfig, batch: int, cache_len: int) -> KVCache:
    return _from_specs(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                       cache_specs(cfg, batch, cache_len))


def cache_shardings(plan: sharding.MeshPlan, cfg: ModelConfig) -> KVCache:
    """Where each buffer lives on the plan's mesh (the axes do not depend on sizes)."""
    return _from_specs(lambda s: plan.sharding(s.logical_axes), cache_specs(cfg, 1, 1))


def _slot_index(buf: jax.Array, rows: jax.Array, slots: jax.Array, keys: bool):
    """Index of (row, slot) pairs in a keys [B,K,Dh,S] or values [B,K,S,Dh] buffer;
    NumPy puts the indexed dims first, so both read as [..., K, Dh]."""
    return (rows, slice(None), slice(None), slots) if keys else (rows, slice(None), slots)


def _write_prompt(buf: jax.Array, new: jax.Array, positions: jax.Array, valid: jax.Array,
                  lengths: jax.Array, keys: bool) -> jax.Array:
    """Scatter a prompt's keys or values [B, T, K, Dh] into slots position mod S.

    Padding, and positions a ring buffer cannot hold (older than the last S),
    go to an out-of-range slot that the scatter drops.
    """
    size = buf.shape[-1] if keys else buf.shape[2]
    keep = valid & (positions >= lengths[:, None] - size)
    slots = jnp.where(keep, positions % size, size)
    rows = jnp.broadcast_to(jnp.arange(buf.shape[0])[:, None], slots.shape)
    return buf.at[_slot_index(buf, rows, slots, keys)].set(new.astype(buf.dtype), mode="drop")


def _write_token(buf: jax.Array, new: jax.Array, lengths: jax.Array, keys: bool,
                 in_place: bool = False) -> jax.Array:
    """Write one token's keys or values [B, 1, K, Dh] at each row's own slot.

    A float32 buffer takes a scatter (in place, one token a row). A bfloat16 one takes
    a select over the buffer instead: XLA:CPU has no bfloat16 scatter, and its float
    normalisation converted the whole buffer to float32 and back at every write (22
    of a 270M decode step's 100 ms at batch 16 on an AMX machine); a scatter on the
    buffer's uint16 bits still copied it. The select reads and writes it once.
    `in_place` (the AMX decode loop's; bfloat16, one device): a custom call writes
    just the token (`amx.write_token`)."""
    size = buf.shape[-1] if keys else buf.shape[2]
    slots = lengths % size
    token = new[:, 0].astype(buf.dtype)  # [B, K, Dh]
    if in_place and buf.dtype == jnp.bfloat16:
        return amx.write_token(buf, token, slots, keys)
    if buf.dtype == jnp.float32:
        return buf.at[_slot_index(buf, jnp.arange(buf.shape[0]), slots, keys)].set(token)
    here = jnp.arange(size) == slots[:, None]  # [B, S]
    if keys:  # [B, K, Dh, S]
        return jnp.where(here[:, None, None, :], token[..., None], buf)
    return jnp.where(here[:, None, :, None], token[:, :, None, :], buf)  # [B, K, S, Dh]


def prefill(params: gemma3.Params, tokens: jax.Array, input_mask: jax.Array, cfg: ModelConfig,
            cache_len: int, lora=None) -> tuple[jax.Array, KVCache]:
    """Run the left-padded prompts [B, T]; return the last token's hidden state [B, D]
    (the last column: left padding puts every row's last token there) and the cache."""
    if tokens.shape[1] > cache_len:
        raise ValueError(f"prompt length {tokens.shape[1]} exceeds the cache length {cache_len}")
    positions = gemma3.left_padded_positions(input_mask)
    lengths = jnp.sum(input_mask, axis=-1, dtype=jnp.int32)
    cache = init_cache(cfg, tokens.shape[0], cache_len)
    over_sequence = gemma3.sequence_attend(self_layout(positions, input_mask), cfg)

    def attend(i, q, k, v):
        out, _ = over_sequence(i, q, k, v)
        return out, (_write_prompt(cache.keys[i], k, positions, input_mask, lengths, True),
                     _write_prompt(cache.values[i], v, positions, input_mask, lengths, False))

    x, bufs = gemma3.decoder_stack(params, gemma3.embed_tokens(params, tokens, cfg), positions,
                                   cfg, attend, lora)
    hidden = gemma3.rms_norm(x[:, -1], params["final_norm"], cfg.rms_eps)
    return hidden, KVCache([k for k, _ in bufs], [v for _, v in bufs], lengths)


def decode_step(params: gemma3.Params, cache: KVCache, tokens: jax.Array, cfg: ModelConfig,
                lora=None) -> tuple[jax.Array, KVCache]:
    """Feed one token per row [B] at position lengths[b]; -> hidden [B, D], updated cache."""
    positions = cache.lengths
    # The AMX decode loop's CPU kernels also write the cache and read the embedding.
    amx_loop = cfg.cpu_kernels == "amx"

    def attend(i, q, k, v):
        k_buf = _write_token(cache.keys[i], k, positions, True, amx_loop)
        v_buf = _write_token(cache.values[i], v, positions, False, amx_loop)
        out = attention.cached_attention(q[:, 0], k_buf, v_buf, positions, cfg,
                                         scale=gemma3.attention_scale(cfg),
                                         window=gemma3.layer_window(cfg, i))
        return out[:, None], (k_buf, v_buf)

    x = gemma3.embed_tokens(params, tokens[:, None], cfg,
                            amx.gather_rows if amx_loop else vocab_parallel.lookup)
    x, bufs = gemma3.decoder_stack(params, x, positions[:, None], cfg, attend, lora)
    hidden = gemma3.rms_norm(x[:, 0], params["final_norm"], cfg.rms_eps)
    return hidden, KVCache([k for k, _ in bufs], [v for _, v in bufs], cache.lengths + 1)


def repeat_rows(cache: KVCache, times: int) -> KVCache:
    """Fan each row out to `times` consecutive rows (prompt-major), for G samples per prompt."""
    return jax.tree.map(lambda x: jnp.repeat(x, times, axis=0), cache)
