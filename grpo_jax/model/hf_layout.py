"""The canonical params as a Hugging Face Gemma 3 checkpoint sees them: tensor names
and layouts, and the `config.json` of the same decoder. What `export` writes as
safetensors and `gguf_export` renames into llama.cpp's layout."""
from __future__ import annotations

from typing import Any

import numpy as np

from grpo_jax.model.config import ModelConfig
from grpo_jax.model import gemma3


def hf_tensors_from_params(params: gemma3.Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Canonical params -> HF Gemma 3 text names and layouts (`model.layers.N....weight`).

    Exactly inverts `weights.params_from_hf_tensors`: projections go back to
    torch's [out, in] layout with heads flattened head-major, norm scales stay in
    Gemma's (1 + scale) convention (HF's Gemma3RMSNorm uses the same), and no
    `lm_head.weight` is written because the output projection is tied to the
    embedding.
    """
    h, k, dh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim

    def arr(x) -> np.ndarray:
        # safetensors wants C-contiguous buffers; transposes are views until copied.
        return np.ascontiguousarray(np.asarray(x))

    def heads(w, n):  # [D, n, dh] -> [n*dh, D]
        return arr(arr(w).transpose(1, 2, 0).reshape(n * dh, d))

    out = {"model.embed_tokens.weight": arr(params["embed"]),
           "model.norm.weight": arr(params["final_norm"])}
    if len(params["layers"]) != cfg.num_layers:
        raise ValueError(f"params have {len(params['layers'])} layers, config {cfg.name!r} "
                         f"has {cfg.num_layers}")
    for i, lp in enumerate(params["layers"]):
        p = f"model.layers.{i}."
        attn, mlp = lp["attn"], lp["mlp"]
        out[p + "self_attn.q_proj.weight"] = heads(attn["q"], h)
        out[p + "self_attn.k_proj.weight"] = heads(attn["k"], k)
        out[p + "self_attn.v_proj.weight"] = heads(attn["v"], k)
        # [H, dh, D] -> [D, H*dh]
        out[p + "self_attn.o_proj.weight"] = arr(arr(attn["o"]).transpose(2, 0, 1)
                                                 .reshape(d, h * dh))
        out[p + "self_attn.q_norm.weight"] = arr(attn["q_norm"])
        out[p + "self_attn.k_norm.weight"] = arr(attn["k_norm"])
        out[p + "input_layernorm.weight"] = arr(lp["pre_attn_norm"])
        out[p + "post_attention_layernorm.weight"] = arr(lp["post_attn_norm"])
        out[p + "pre_feedforward_layernorm.weight"] = arr(lp["pre_ffw_norm"])
        out[p + "post_feedforward_layernorm.weight"] = arr(lp["post_ffw_norm"])
        out[p + "mlp.gate_proj.weight"] = arr(arr(mlp["gate"]).T)  # [D, F] -> [F, D]
        out[p + "mlp.up_proj.weight"] = arr(arr(mlp["up"]).T)
        out[p + "mlp.down_proj.weight"] = arr(arr(mlp["down"]).T)  # [F, D] -> [D, F]
    return out


def hf_config_dict(cfg: ModelConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """A `config.json` for `Gemma3ForCausalLM` describing the same decoder as `cfg`.

    Written for transformers 5 (`rope_parameters` per layer type, `layer_types`)
    and also carrying the 4.x keys (`rope_theta`, `rope_local_base_freq`,
    `rope_scaling`, `sliding_window_pattern`) so older readers agree.
    """
    layer_types = ["full_attention" if cfg.is_global_layer(i) else "sliding_attention"
                   for i in range(cfg.num_layers)]
    local = {"rope_type": "default", "rope_theta": cfg.rope_base_local}
    full: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_base_global}
    legacy_scaling = None
    if cfg.rope_scale_global != 1.0:
        # Our positions / scale on global layers is HF's linear RoPE scaling.
        legacy_scaling = {"rope_type": "linear", "factor": cfg.rope_scale_global}
        full = {**legacy_scaling, "rope_theta": cfg.rope_base_global}
    scalar = cfg.query_pre_attn_scalar
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.ffw_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        # gemma3.py's MLP uses jax.nn.gelu(approximate=True): the tanh approximation.
        "hidden_activation": "gelu_pytorch_tanh",
        # ModelConfig has no context length; Gemma 3 pairs 8x linear RoPE scaling with
        # 128K contexts (4B and larger) and runs 32K without it (270M, 1B).
        "max_position_embeddings": 131_072 if cfg.rope_scale_global != 1.0 else 32_768,
        "rms_norm_eps": cfg.rms_eps,
        "query_pre_attn_scalar": int(scalar) if float(scalar).is_integer() else scalar,
        "sliding_window": cfg.sliding_window,
        "layer_types": layer_types,
        "sliding_window_pattern": cfg.global_every,
        "rope_parameters": {"sliding_attention": local, "full_attention": full},
        "rope_theta": cfg.rope_base_global,
        "rope_local_base_freq": cfg.rope_base_local,
        "rope_scaling": legacy_scaling,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "use_bidirectional_attention": False,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,  # the 4.x spelling of "dtype"
    }
