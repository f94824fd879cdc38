"""Export a trained run as merged Hugging Face weights:

    python -m grpo_jax.export --run-dir runs/tiny --out exports/tiny [--step N]
        [--dtype float32|bfloat16] [--overwrite]

The run's base model is loaded as training loaded it (`runs.load_run_base`), its
LoRA is restored from the run's checkpoints (the latest, or --step), folded into
the base weights (`lora.merge`), and the result is written as a Gemma 3 text
checkpoint that `transformers.Gemma3ForCausalLM.from_pretrained(out)` loads:
`model.safetensors`, `config.json`, `generation_config.json` (the run's stop ids
as EOS) and, when the run's tokenizer is sentencepiece, `tokenizer.model` and a
`tokenizer_config.json` (so `AutoTokenizer` adds BOS as we do). The directory
appears whole or not at all: it is written beside the target and renamed into place.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from safetensors.numpy import save_file

from grpo_jax import fileio, runs
from grpo_jax.cli import run_cli
from grpo_jax.config import ModelConfig
from grpo_jax.model import gemma3, lora as lora_lib

log = logging.getLogger("grpo_jax.export")

DTYPES = ("float32", "bfloat16")


class ExportError(ValueError):
    """Bad input to the export: an unknown dtype or a refused out dir (a missing run,
    checkpoint or step is reported by `runs`)."""


# ---------------------------------------------------------------------------
# Canonical params -> HF Gemma 3 tensors (the inverse of weights.params_from_hf_tensors)


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


# ---------------------------------------------------------------------------
# Writing a checkpoint directory


def _check_out_dir(out_dir: Path, overwrite: bool, protect: Path | None = None) -> None:
    """Refuse before any heavy work: an existing non-empty out dir (unless overwrite),
    a file in its place, or (even with overwrite) a directory holding the run itself."""
    out_dir = Path(out_dir)
    if protect is not None:
        out_abs, run_abs = out_dir.resolve(), Path(protect).resolve()
        if out_abs == run_abs or out_abs in run_abs.parents:
            raise ExportError(f"--out {out_dir} would replace the run directory {protect}; "
                              "choose another directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"--out {out_dir} exists and is not empty; pass --overwrite to "
                          "replace it")
    # The export is written beside out_dir and renamed into place: that must be possible.
    fileio.check_writable(Path(os.path.abspath(out_dir)).parent)


def write_hf_checkpoint(out_dir: str | os.PathLike, params: gemma3.Params, cfg: ModelConfig,
                        *, tokenizer: Any = None, dtype: str = "float32",
                        overwrite: bool = False, stop_ids: Sequence[int] = (1,),
                        metadata: dict[str, str] | None = None) -> Path:
    """Write params as an HF Gemma 3 checkpoint directory, atomically.

    Everything goes into a temporary sibling first and is renamed into place at
    the end, so an interrupted export never leaves a half-written `out_dir`.
    """
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out_dir = Path(os.path.abspath(out_dir))  # "." or "x/.." get a real name and parent
    _check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(jnp.dtype(dtype))  # bfloat16 via ml_dtypes
    tensors = {name: np.ascontiguousarray(w.astype(np_dtype))
               for name, w in hf_tensors_from_params(params, cfg).items()}

    # Not mkdtemp: its 0700 would become the export's permissions after the rename.
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        # transformers refuses safetensors files whose metadata lacks a known format;
        # the bytes are framework-neutral, "pt" is what save_pretrained writes.
        save_file(tensors, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", **(metadata or {})})
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg, dtype=dtype), indent=2))
        stops = [int(s) for s in stop_ids]
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 2, "pad_token_id": 0,
             "eos_token_id": stops[0] if len(stops) == 1 else stops}, indent=2))
        if hasattr(tokenizer, "model_proto"):
            (tmp / "tokenizer.model").write_bytes(tokenizer.model_proto().SerializeToString())
            (tmp / "tokenizer_config.json").write_text(json.dumps(
                _tokenizer_config(tokenizer), indent=2))
        else:
            log.info("tokenizer %r has no sentencepiece model: no tokenizer.model written",
                     tokenizer)
        # safetensors creates its file owner-only; give it the mode (umask) that the
        # JSON files got.
        (tmp / "model.safetensors").chmod((tmp / "config.json").stat().st_mode & 0o777)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _tokenizer_config(tokenizer) -> dict[str, Any]:
    """What `AutoTokenizer` needs beside tokenizer.model to encode as we do: without
    add_bos_token it leaves out the BOS that `Tokenizer.encode` puts first."""
    piece = tokenizer.id_to_piece
    return {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_id),
            "pad_token": piece(tokenizer.pad_id), "unk_token": piece(tokenizer.unk_id)}


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src to dst. A non-empty dst (already checked replaceable) is moved aside
    first and deleted only once src is in place; if that rename fails, it goes back."""
    if not (dst.is_dir() and any(dst.iterdir())):
        os.replace(src, dst)  # rename itself replaces an empty directory
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.replace(dst, aside / "old")
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(aside / "old", dst)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def export_merged(run_dir: str | os.PathLike, *, out_dir: str | os.PathLike,
                  checkpoint_step: int | None = None, dtype: str = "float32",
                  overwrite: bool = False) -> Path:
    """Merge a run's LoRA (latest checkpoint, or `checkpoint_step`) into its base weights
    and write the HF checkpoint to `out_dir`. Returns `out_dir`."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    # Every cheap check first: loading the base (a 262k-entry GGUF vocabulary) takes a while.
    cfg = runs.run_config(run_dir)
    runs.checkpoint_steps(run_dir, cfg, checkpoint_step)
    _check_out_dir(out_dir, overwrite, protect=run_dir)

    model_cfg, params, tokenizer = runs.load_run_base(cfg)
    adapters = runs.restore_adapters(run_dir, cfg, model_cfg, checkpoint_step)
    step = adapters.step
    # SFT adapters first (GRPO trained on top of that merge), then GRPO's.
    merged = jax.device_get(lora_lib.merge(*adapters.policy(params)))
    log.info("merged LoRA (rank %d, step %d%s) of %s into %s", cfg.lora.rank, step,
             ", SFT + GRPO adapters" if adapters.sft is not None and adapters.grpo is not None
             else "", run_dir, model_cfg.name)
    write_hf_checkpoint(out_dir, merged, model_cfg, tokenizer=tokenizer, dtype=dtype,
                        overwrite=overwrite, stop_ids=cfg.sampler.stop_ids,
                        metadata={"grpo_jax_run": str(run_dir), "grpo_jax_step": str(step)})
    log.info("wrote %s (%s)", out_dir, dtype)
    return out_dir


# ---------------------------------------------------------------------------
# CLI


@dataclasses.dataclass(frozen=True)
class ExportArgs:
    """Write a training run's base + LoRA merged weights as a Hugging Face checkpoint."""

    run_dir: Path
    """A training run's --output-dir (its config.json and checkpoints/)."""
    out: Path
    """Output directory: model.safetensors, config.json, generation_config.json and, for
    sentencepiece tokenizers, tokenizer.model and tokenizer_config.json."""
    step: int | None = None
    """Checkpoint step to export (default: the latest)."""
    dtype: str = "float32"
    """Weight dtype written: float32 or bfloat16."""
    overwrite: bool = False
    """Replace an existing non-empty --out directory."""


def main(argv: Sequence[str] | None = None) -> int:
    args = tyro.cli(ExportArgs, args=argv)
    return run_cli(lambda: export_merged(args.run_dir, out_dir=args.out,
                                         checkpoint_step=args.step, dtype=args.dtype,
                                         overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
