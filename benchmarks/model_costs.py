"""What a model costs to run, counted from its config: matmul FLOPs per token and KV
cache bytes (the benchmarks' ceilings are these over the machine's measured rates)."""
from __future__ import annotations

import math

from grpo_jax.model import gemma3, kv_cache
from grpo_jax.model.config import ModelConfig


def model_flops_per_token(cfg: ModelConfig, context: float, logits: bool = True) -> float:
    """Matmul FLOPs of one token: 2 x the weights it multiplies (the layers, plus the
    tied logits when computed; the embedding lookup is free) + attention over
    `context` earlier positions (capped by each layer's window)."""
    d, h, k, dh, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffw_dim
    per_layer = d * (h + 2 * k) * dh + h * dh * d + 3 * d * f
    attn = sum(4 * h * dh * min(context, gemma3.layer_window(cfg, i) or math.inf)
               for i in range(cfg.num_layers))
    return 2.0 * (cfg.num_layers * per_layer + logits * cfg.vocab_size * d) + attn


def cache_bytes(cfg: ModelConfig, batch: int, cache_len: int) -> int:
    """Bytes of the key and value buffers."""
    specs = kv_cache.cache_specs(cfg, batch, cache_len)
    return sum(math.prod(s.shape) * s.dtype.itemsize for s in specs.keys + specs.values)
