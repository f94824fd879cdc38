"""Canonical params -> a GGUF file that llama.cpp and Ollama run (architecture `gemma3`).

The tensors are the exact inverse of `weights.load_gguf`: the HF layout of
`hf_layout.hf_tensors_from_params` under llama.cpp's names (GGUF's numpy view of a
matrix is HF's [out, in]), with every `*norm.weight` stored as (1 + scale), as
llama.cpp's converter writes Gemma norms. Dtypes follow `convert_hf_to_gguf.py`:
1-D tensors (the norms) stay float32; matrices are f16, or q8_0 (`--outtype q8_0`
there, token embedding included; a row that is not a whole number of 32-value
blocks falls back to f16, as it does there).

The architecture numbers come from the ModelConfig; the vocabulary (`tokenizer.*`
keys) is copied from a source GGUF, normally the base model's own file, since
LoRA training leaves the tokenizer untouched.
"""
from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any, Mapping

import gguf
import gguf.quants
import numpy as np

from grpo_jax import fileio
from grpo_jax.model.config import ModelConfig
from grpo_jax.model import gemma3, weights
from grpo_jax.model.hf_layout import hf_config_dict, hf_tensors_from_params

ARCH = "gemma3"
QUANTS = ("f16", "q8_0")
_FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}

# llama.cpp's per-layer names, the inverse of the loader's table.
_LAYER_NAMES = {hf: name for name, hf in weights._GGUF_LAYER_NAMES.items()}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")

# Rows quantized at a time: gguf's numpy q8_0 needs a few float32 temporaries per
# value, ~2.5 GB at once for Gemma 3's 262k x 640 embedding.
_QUANT_ROWS = 16384

# Used when the vocabulary source has no template (the embedded 270M's file has none):
# llama.cpp would otherwise fall back to ChatML. It renders `tokenizer.chat_prompt`'s
# turns (no trimming, so what the model trained on) after <bos>, which llama.cpp drops
# when it adds BOS itself; a system message joins the first user turn, as in
# Google's own template (Gemma has no system role).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set first = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role'])"
    " + '\\n' + (first if loop.first else '') + message['content'] + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}")


class GGUFExportError(ValueError):
    """A model llama.cpp's gemma3 cannot run as configured, a vocabulary source that
    does not fit, or a refused output path."""


def check_llama_cpp_compatible(cfg: ModelConfig) -> None:
    """llama.cpp (and Ollama) hard-code parts of Gemma 3 that ModelConfig makes
    settable; a model they would silently run differently is refused."""
    problems = []
    if cfg.global_every != 6:
        problems.append(f"a global layer every {cfg.global_every} (llama.cpp: every 6th)")
    if cfg.rope_base_local != 10_000.0:
        problems.append(f"local RoPE base {cfg.rope_base_local:g} (llama.cpp: 10000)")
    # llama.cpp scales queries by head_dim ** -0.5, except on the 62-layer 27B
    # (embed_dim // num_heads, integer division as there).
    scalar = cfg.embed_dim // cfg.num_heads if cfg.num_layers == 62 else cfg.head_dim
    if cfg.query_pre_attn_scalar != scalar:
        problems.append(f"query_pre_attn_scalar {cfg.query_pre_attn_scalar:g} (llama.cpp "
                        f"derives {scalar})")
    if problems:
        raise GGUFExportError(f"llama.cpp's gemma3 cannot run model {cfg.name!r} as "
                              f"configured: {'; '.join(problems)}")


def gguf_name(hf_name: str) -> str:
    """HF Gemma 3 tensor name -> llama.cpp's (`model.layers.3.mlp.up_proj.weight` ->
    `blk.3.ffn_up.weight`)."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    m = _HF_LAYER.match(hf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise GGUFExportError(f"no llama.cpp name for tensor {hf_name}")
    return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"


def gguf_tensors(params: gemma3.Params, cfg: ModelConfig, *,
                 vocab_size: int | None = None) -> dict[str, np.ndarray]:
    """Float32 tensors under llama.cpp's names, in GGUF's numpy layout and norm convention.

    `vocab_size`: the GGUF vocabulary's length. Embedding rows past it are dropped,
    as llama.cpp's converter does (Gemma 3 4B has 262208 rows for 262144 pieces);
    llama.cpp sizes its vocabulary from the token list and the loader from the rows.
    """
    out = {}
    for hf, w in hf_tensors_from_params(params, cfg).items():
        name = gguf_name(hf)
        w = np.asarray(w, np.float32)
        if name.endswith("norm.weight"):  # load_gguf subtracts 1 from exactly these
            w = w + 1.0
        out[name] = w
    if vocab_size is not None:
        rows = out["token_embd.weight"].shape[0]
        if rows < vocab_size:
            raise GGUFExportError(f"the model has {rows} embedding rows but the vocabulary "
                                  f"has {vocab_size} tokens")
        out["token_embd.weight"] = out["token_embd.weight"][:vocab_size]
    return out


def tensor_type(name: str, w: np.ndarray, quant: str) -> gguf.GGMLQuantizationType:
    """The GGML type llama.cpp's converter picks: f32 for 1-D tensors and norms, else
    the requested type (q8_0 only where rows split into whole 32-value blocks)."""
    if w.ndim <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    if quant == "q8_0":
        block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
        if w.shape[-1] % block == 0:
            return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def _encode(name: str, w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(w, np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        with np.errstate(over="ignore"):  # reported below, naming the tensor
            h = np.ascontiguousarray(w.astype(np.float16))
        if not np.all(np.isfinite(h)):  # |w| > 65504: the loader would refuse the file
            raise GGUFExportError(f"tensor {name} overflows float16; use --format "
                                  "safetensors")
        return h
    return np.concatenate([gguf.quants.quantize(np.ascontiguousarray(w[i:i + _QUANT_ROWS]),
                                                qtype)
                           for i in range(0, w.shape[0], _QUANT_ROWS)])


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def vocab_size(reader) -> int:
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFExportError("the vocabulary source GGUF has no tokenizer.ggml.tokens")
    return len(tokens.data)


def _copy_tokenizer(writer: gguf.GGUFWriter, reader) -> None:
    """Every tokenizer.* key (tokenizer.ggml.*, tokenizer.chat_template...) with its
    own GGUF value types, so the vocabulary reads back exactly as written."""
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = None
        if vtype == gguf.GGUFValueType.ARRAY:
            if len(field.types) != 2:
                raise GGUFExportError(f"vocabulary key {key} is a nested array")
            if not field.data:
                continue  # GGUF cannot write an empty array; absent reads the same
            sub_type = field.types[1]
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def check_out_file(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse before any heavy work: a directory at `path`, or an existing file without
    `overwrite`; and prove the directory it goes to takes writes."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        raise GGUFExportError(f"--out {path} is a directory; name the .gguf file to write")
    if path.exists() and not overwrite:
        raise GGUFExportError(f"--out {path} exists; pass --overwrite to replace it")
    fileio.check_writable(path.parent)
    return path


def write_gguf(path: str | os.PathLike, params: gemma3.Params, cfg: ModelConfig, *,
               vocab: Any, quant: str = "f16", name: str | None = None,
               metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write params as a llama.cpp gemma3 GGUF file, atomically.

    vocab: the GGUF (path or open `gguf.GGUFReader`) whose tokenizer.* keys are copied.
    metadata: extra string keys (e.g. provenance). The file is written beside `path`
    and renamed over it, so a reader never sees half of one.
    """
    if quant not in QUANTS:
        raise GGUFExportError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    check_llama_cpp_compatible(cfg)
    path = check_out_file(path, overwrite)
    reader = weights.open_gguf(vocab) if isinstance(vocab, (str, os.PathLike)) else vocab
    tensors = gguf_tensors(params, cfg, vocab_size=vocab_size(reader))

    w = gguf.GGUFWriter(None, ARCH)  # general.architecture = gemma3
    w.add_type("model")
    w.add_name(name or cfg.name)
    if (license_ := _field(reader, "general.license")) is not None:
        w.add_license(license_)  # merged weights remain under the base model's terms
    if (base_name := _field(reader, "general.name")) is not None:
        w.add_base_model_count(1)
        w.add_base_model_name(0, base_name)
    w.add_file_type(_FILE_TYPES[quant])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # The keys llama.cpp's gemma3 loader reads, in convert_hf_to_gguf.py's spelling.
    w.add_context_length(hf_config_dict(cfg)["max_position_embeddings"])
    w.add_embedding_length(cfg.embed_dim)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.ffw_dim)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_freq_base(cfg.rope_base_global)
    w.add_sliding_window(cfg.sliding_window)
    if cfg.rope_scale_global != 1.0:
        # llama.cpp applies it to the global layers only (its SWA layers use scale 1).
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scale_global)
    # Ollama's own gemma3 engine reads the RoPE bases under these names (with these
    # values as defaults); llama.cpp ignores them.
    w.add_float32(f"{ARCH}.rope.global.freq_base", cfg.rope_base_global)
    w.add_float32(f"{ARCH}.rope.local.freq_base", cfg.rope_base_local)

    _copy_tokenizer(w, reader)
    if "tokenizer.chat_template" not in reader.fields:
        w.add_chat_template(GEMMA_CHAT_TEMPLATE)
    for key, value in (metadata or {}).items():
        w.add_string(key, str(value))

    for tname in list(tensors):
        t = tensors.pop(tname)  # free each float32 tensor once encoded
        qtype = tensor_type(tname, t, quant)
        w.add_tensor(tname, _encode(tname, t, qtype), raw_dtype=qtype)

    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename must not land before the bytes do
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
