"""Checkpoint readers: GGUF, Gemma Flax/orbax (Kaggle), Hugging Face safetensors.

Each reader turns its format into the canonical params tree of
`grpo_jax.model.gemma3` and validates every tensor against the config's one
parameter description, so a mismatch names the tensor instead of failing deep
inside a matmul.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable, Mapping

import gguf
import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors import SafetensorError
from safetensors.flax import load_file as load_flax_safetensors
from safetensors.numpy import load_file

from grpo_jax.model.config import ModelConfig
from grpo_jax.model import gemma3
from grpo_jax.model.gguf_fast import FastGGUFReader, dequantize


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the config."""


def _require_exists(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    return path


def _all_finite(arr: np.ndarray, chunk_bytes: int = 1 << 24) -> bool:
    """np.isfinite(arr).all() without a full-size temporary (the 270M's embedding: 168M)."""
    flat = arr.reshape(-1)  # a view, unless arr is not contiguous
    step = max(1, chunk_bytes // flat.itemsize)
    return all(np.isfinite(flat[i:i + step]).all() for i in range(0, flat.size, step))


def _to_params(named: Mapping[tuple, np.ndarray], cfg: ModelConfig, source: str) -> gemma3.Params:
    """Place tensors named by canonical key paths into the params tree, checking shapes.

    `named` maps a key path such as ("layers", 3, "attn", "q") to an array.
    """
    specs = gemma3.param_specs(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, gemma3.ParamSpec))
    leaves, missing = [], []
    for path, spec in flat:
        key = tuple(getattr(p, "key", getattr(p, "idx", None)) for p in path)
        name = "/".join(str(k) for k in key)
        if key not in named:
            missing.append(name)
            continue
        arr = np.asarray(named[key])
        if tuple(arr.shape) != spec.shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(arr.shape)}, but config "
                f"{cfg.name!r} expects {spec.shape}")
        if not _all_finite(arr):
            raise CheckpointError(f"{source}: tensor {name} holds non-finite values")
        leaves.append(np.ascontiguousarray(arr, cfg.weight_dtype))  # copies only if it must
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} tensors missing for config {cfg.name!r} "
            f"(first: {', '.join(missing[:3])})")
    extra_layers = sorted({k[1] for k in named if k[0] == "layers" and k[1] >= cfg.num_layers})
    if extra_layers:
        raise CheckpointError(
            f"{source}: checkpoint has layer {extra_layers[0]} but config {cfg.name!r} has "
            f"{cfg.num_layers} layers")
    return jax.tree.unflatten(treedef, leaves)


# ---------------------------------------------------------------------------
# Hugging Face layout (also what GGUF tensors are, once renamed)

_HF_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")


def _hf_layer_tensor(suffix: str, w: np.ndarray, cfg: ModelConfig) -> list[tuple[tuple, np.ndarray]]:
    h, k, dh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim

    def heads(w, n):  # [n*dh, D] -> [D, n, dh]
        if w.shape != (n * dh, d):
            raise CheckpointError(f"{suffix}: shape {w.shape}, expected {(n * dh, d)}")
        return w.reshape(n, dh, d).transpose(2, 0, 1)

    if suffix == "self_attn.q_proj":
        return [(("attn", "q"), heads(w, h))]
    if suffix == "self_attn.k_proj":
        return [(("attn", "k"), heads(w, k))]
    if suffix == "self_attn.v_proj":
        return [(("attn", "v"), heads(w, k))]
    if suffix == "self_attn.o_proj":  # [D, H*dh] -> [H, dh, D]
        if w.shape != (d, h * dh):
            raise CheckpointError(f"{suffix}: shape {w.shape}, expected {(d, h * dh)}")
        return [(("attn", "o"), w.reshape(d, h, dh).transpose(1, 2, 0))]
    simple = {
        "self_attn.q_norm": ("attn", "q_norm"),
        "self_attn.k_norm": ("attn", "k_norm"),
        "input_layernorm": ("pre_attn_norm",),
        "post_attention_layernorm": ("post_attn_norm",),
        "pre_feedforward_layernorm": ("pre_ffw_norm",),
        "post_feedforward_layernorm": ("post_ffw_norm",),
    }
    if suffix in simple:
        return [(simple[suffix], w)]
    transposed = {"mlp.gate_proj": ("mlp", "gate"), "mlp.up_proj": ("mlp", "up"),
                  "mlp.down_proj": ("mlp", "down")}
    if suffix in transposed:
        return [(transposed[suffix], w.T)]
    raise CheckpointError(f"unexpected tensor layers.N.{suffix}")


def params_from_hf_tensors(tensors: Mapping[str, np.ndarray], cfg: ModelConfig,
                           source: str = "checkpoint") -> gemma3.Params:
    """HF Gemma 3 names (`model.layers.0.self_attn.q_proj.weight`, ...) -> canonical params.

    Accepts the text-only (`model.`) and multimodal (`model.language_model.`,
    `language_model.model.`) prefixes; vision tensors and `lm_head` (tied) are ignored.
    """
    named: dict[tuple, np.ndarray] = {}
    for name, w in tensors.items():
        for prefix in ("model.language_model.", "language_model.model.", "model."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if name == "embed_tokens.weight":
            named[("embed",)] = w
        elif name == "norm.weight":
            named[("final_norm",)] = w
        elif m := _HF_LAYER.match(name):
            layer = int(m.group(1))
            try:
                for key, arr in _hf_layer_tensor(m.group(2), np.asarray(w), cfg):
                    named[("layers", layer) + key] = arr
            except CheckpointError as e:
                raise CheckpointError(f"{source}: layer {layer} {e}") from None
        # Anything else (lm_head tied to the embedding, vision tower, projector) is not ours.
    return _to_params(named, cfg, source)


def load_safetensors(path: str | os.PathLike, cfg: ModelConfig) -> gemma3.Params:
    """A HF checkpoint directory (one or many *.safetensors) or a single file."""
    path = _require_exists(path, "safetensors checkpoint")
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            if _is_bf16_file(_safetensors_header(f)):
                tensors.update(_load_bf16_safetensors(f))
            else:
                tensors.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {f}: {e}") from None
    return params_from_hf_tensors(tensors, cfg, source=str(path))


def _safetensors_header(f: Path) -> dict:
    """The JSON header, after checking the file holds all the tensor data it describes."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{f} is truncated (no safetensors header)")
        n = struct.unpack("<Q", head)[0]
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{f} is truncated or not a safetensors file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{f} is not a safetensors file")
    ends = [v["data_offsets"][1] for v in header.values()
            if isinstance(v, dict) and len(v.get("data_offsets", ())) == 2]
    if ends and 8 + n + max(ends) > size:
        raise CheckpointError(
            f"{f} is truncated: its header describes {8 + n + max(ends)} bytes, "
            f"the file has {size}")
    return header


def _is_bf16_file(header: dict) -> bool:
    return any(isinstance(v, dict) and v.get("dtype") == "BF16" for v in header.values())


def _load_bf16_safetensors(f: Path) -> dict[str, np.ndarray]:
    # numpy has no bfloat16; ml_dtypes (a jax dependency) does, via the flax loader.
    return {k: np.asarray(v) for k, v in load_flax_safetensors(str(f)).items()}


# ---------------------------------------------------------------------------
# GGUF (llama.cpp)

_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def open_gguf(path: str | os.PathLike):
    path = _require_exists(path, "GGUF file")
    try:
        return FastGGUFReader(str(path))
    except Exception as e:  # the reader raises assorted errors on a bad file
        with open(path, "rb") as fh:
            what = "truncated or corrupt" if fh.read(4) == b"GGUF" else "not a GGUF file"
        detail = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"cannot read GGUF file {path} ({what}): {type(e).__name__}: {detail}") from None


def _gguf_field(reader, name: str, default=None):
    field = reader.fields.get(name)
    return default if field is None else field.contents()


def config_from_gguf(reader, base: ModelConfig | None = None) -> ModelConfig:
    """Architecture numbers read from GGUF metadata, on top of a base preset."""
    arch = _gguf_field(reader, "general.architecture")
    if arch != "gemma3":
        raise CheckpointError(f"GGUF architecture is {arch!r}, expected 'gemma3'")
    g = lambda key: _gguf_field(reader, f"gemma3.{key}")  # noqa: E731
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    embed_dim, heads = g("embedding_length"), g("attention.head_count")
    head_dim = g("attention.key_length") or embed_dim // heads
    fields = dict(
        vocab_size=len(tokens) if tokens is not None else None,
        embed_dim=embed_dim, num_layers=g("block_count"), num_heads=heads,
        num_kv_heads=g("attention.head_count_kv"), head_dim=head_dim,
        ffw_dim=g("feed_forward_length"), sliding_window=g("attention.sliding_window"),
        rms_eps=g("attention.layer_norm_rms_epsilon"), rope_base_global=g("rope.freq_base"),
        query_pre_attn_scalar=float(head_dim))
    fields = {k: v for k, v in fields.items() if v is not None}
    name = str(_gguf_field(reader, "general.name", "gguf"))
    if base is None:
        missing = {"vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
                   "ffw_dim", "sliding_window"} - fields.keys()
        if missing:
            raise CheckpointError(f"GGUF metadata lacks {sorted(missing)}")
        return ModelConfig(name=name, **fields)
    return dataclasses.replace(base, **fields)


def load_gguf(path_or_reader, cfg: ModelConfig) -> gemma3.Params:
    """Dequantize every tensor (any GGML type the `gguf` package knows) to float32.

    llama.cpp's converter stores Gemma norm weights as (1 + scale); undo that.
    GGUF's numpy view of a matrix is HF's [out, in] layout, so the HF mapping applies.
    """
    if isinstance(path_or_reader, (str, os.PathLike)):
        reader, source = open_gguf(path_or_reader), str(path_or_reader)
    else:
        reader, source = path_or_reader, "GGUF file"
    hf: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        try:
            w = dequantize(t.data, t.tensor_type)
            # A float32 tensor is a view of the file's memory map: own a copy. The
            # dequantized ones are new float32 arrays already (fresh memory costs here:
            # a page first touched costs ~4 s a GB on the VMs this runs on).
            w = np.array(w, np.float32) if t.tensor_type == gguf.GGMLQuantizationType.F32 \
                else w.astype(np.float32, copy=False)
        except Exception as e:
            raise CheckpointError(f"cannot dequantize GGUF tensor {t.name}: {e}") from None
        if t.name.endswith("norm.weight"):
            w = w - 1.0
        if t.name == "token_embd.weight":
            hf["embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            hf["norm.weight"] = w
        elif m := _GGUF_LAYER.match(t.name):
            if m.group(2) not in _GGUF_LAYER_NAMES:
                raise CheckpointError(f"unexpected GGUF tensor {t.name}")
            hf[f"layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.weight"] = w
        # output.weight would be an untied head; Gemma ties it, so none is expected.
    return params_from_hf_tensors(hf, cfg, source=source)


# ---------------------------------------------------------------------------
# Gemma Flax / orbax (Kaggle `google/gemma-3/flax/...`)

_ORBAX_LAYER = re.compile(r"(?:^|/)layer_(\d+)/(.+)$")


def _orbax_layer_tensors(sub: str, prop: str, w: np.ndarray) -> list[tuple[tuple, np.ndarray]]:
    if sub == "attn/q_einsum":  # [H, D, dh]
        return [(("attn", "q"), w.transpose(1, 0, 2))]
    if sub == "attn/kv_einsum":  # [2, K, D, dh]
        return [(("attn", "k"), w[0].transpose(1, 0, 2)), (("attn", "v"), w[1].transpose(1, 0, 2))]
    if sub == "attn/qkv_einsum":  # [3, H, D, dh]
        return [(("attn", n), w[i].transpose(1, 0, 2)) for i, n in enumerate("qkv")]
    if sub == "attn/attn_vec_einsum":  # [H, dh, D]
        return [(("attn", "o"), w)]
    if sub == "mlp/gating_einsum":  # [2, F, D]
        return [(("mlp", "gate"), w[0].T), (("mlp", "up"), w[1].T)]
    if sub == "mlp/linear":  # [F, D]
        return [(("mlp", "down"), w)]
    simple = {"attn/_query_norm": ("attn", "q_norm"), "attn/_key_norm": ("attn", "k_norm"),
              "pre_attention_norm": ("pre_attn_norm",), "post_attention_norm": ("post_attn_norm",),
              "pre_ffw_norm": ("pre_ffw_norm",), "post_ffw_norm": ("post_ffw_norm",)}
    if sub in simple:
        return [(simple[sub], w)]
    raise CheckpointError(f"unexpected orbax tensor layer_N/{sub}/{prop}")


def _flatten_orbax(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """{'transformer/layer_0/attn/q_einsum': {'w': x}} (or fully nested) -> {'.../w': x}."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten_orbax(v, name))
        else:
            out[name] = v
    return out


def params_from_orbax_tree(tree: Mapping[str, Any], cfg: ModelConfig,
                           source: str = "orbax checkpoint") -> gemma3.Params:
    named: dict[tuple, np.ndarray] = {}
    for name, w in _flatten_orbax(tree).items():
        path, _, prop = name.rpartition("/")
        w = np.asarray(w)
        if path.endswith("embedder"):
            if prop == "input_embedding":
                named[("embed",)] = w
            # mm_* (vision projection) tensors are not part of the text decoder.
        elif path.endswith("final_norm"):
            named[("final_norm",)] = w
        elif m := _ORBAX_LAYER.search(path):
            layer = int(m.group(1))
            for key, arr in _orbax_layer_tensors(m.group(2), prop, w):
                named[("layers", layer) + key] = arr
        elif path.split("/")[0].startswith("SigLiP") or "embedder/mm_" in path:
            # Vision encoder, and (4B+) 'transformer/embedder/mm_input_projection' and
            # 'transformer/embedder/mm_soft_embedding_norm': not the text decoder.
            continue
        else:
            raise CheckpointError(f"{source}: unexpected tensor {name}")
    return _to_params(named, cfg, source)


def load_orbax(path: str | os.PathLike, cfg: ModelConfig) -> gemma3.Params:
    path = _require_exists(path, "orbax checkpoint").resolve()
    try:
        tree = ocp.PyTreeCheckpointer().restore(path)
    except Exception as e:
        raise CheckpointError(f"cannot restore orbax checkpoint {path}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return params_from_orbax_tree(tree, cfg, source=str(path))


def detect_checkpoint_format(path: str | os.PathLike) -> str:
    """'gguf', 'safetensors' or 'orbax' for a file or directory."""
    path = _require_exists(path, "checkpoint")
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        if path.suffix == ".safetensors":
            return "safetensors"
    elif any(path.glob("*.safetensors")):
        return "safetensors"
    elif (path / "_METADATA").exists() or (path / "manifest.ocdbt").exists() \
            or (path / "_CHECKPOINT_METADATA").exists():
        return "orbax"
    raise CheckpointError(
        f"{path}: not a GGUF file, a safetensors file/directory, or an orbax checkpoint")


LOADERS: dict[str, Callable[[Any, ModelConfig], gemma3.Params]] = {
    "gguf": load_gguf, "safetensors": load_safetensors, "orbax": load_orbax}


def load_params(path: str | os.PathLike, cfg: ModelConfig) -> gemma3.Params:
    return LOADERS[detect_checkpoint_format(path)](path, cfg)
