"""Export a trained run as merged Hugging Face weights:

    python -m grpo_jax.export --run-dir runs/tiny --out exports/tiny [--step N]
        [--dtype float32|bfloat16] [--overwrite]

The run's base model is loaded as training loaded it (`runs.load_run_base`), in
float32 whatever the run computed in, its
LoRA is restored from the run's checkpoints (the latest, or --step), folded into
the base weights (`lora.merge`), and the result is written as a Gemma 3 text
checkpoint that `transformers.Gemma3ForCausalLM.from_pretrained(out)` loads:
`model.safetensors`, `config.json`, `generation_config.json` (the run's stop ids
as EOS) and, when the run's tokenizer is sentencepiece, `tokenizer.model` and a
`tokenizer_config.json` (so `AutoTokenizer` adds BOS as we do). The directory
appears whole or not at all: it is written beside the target and renamed into place.

    python -m grpo_jax.export --run-dir runs/x --out exports/x.gguf --format gguf
        [--quant f16|q8_0] [--step N] [--overwrite]

writes the same merged weights as one GGUF file for llama.cpp / Ollama
(`gguf_export.write_gguf`), its vocabulary copied from the run's base GGUF (the
embedded 270M's file for a run on the embedded model, or on a checkpoint whose
tokenizer encodes as that file's does).
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

from grpo_jax import fileio, gguf_export, runs
from grpo_jax.cli import run_cli
from grpo_jax.config import TrainConfig
from grpo_jax.model.config import ModelConfig, TINY, model_preset
from grpo_jax.model import gemma3, load, lora as lora_lib, weights
from grpo_jax.model.hf_layout import hf_config_dict, hf_tensors_from_params

log = logging.getLogger("grpo_jax.export")

DTYPES = ("float32", "bfloat16")
FORMATS = ("safetensors", "gguf")


class ExportError(ValueError):
    """Bad input to the export: an unknown dtype or a refused out dir (a missing run,
    checkpoint or step is reported by `runs`)."""


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

    model_cfg, merged, tokenizer, step = _merged_policy(run_dir, cfg, checkpoint_step)
    write_hf_checkpoint(out_dir, merged, model_cfg, tokenizer=tokenizer, dtype=dtype,
                        overwrite=overwrite, stop_ids=cfg.sampler.stop_ids,
                        metadata={"grpo_jax_run": str(run_dir), "grpo_jax_step": str(step)})
    log.info("wrote %s (%s)", out_dir, dtype)
    return out_dir


def _merged_policy(run_dir: Path, cfg: TrainConfig, checkpoint_step: int | None):
    """(model config, merged params on the host, tokenizer, step) of a run's checkpoint."""
    # The merge is made in float32 whatever the run computed in (`--dtype auto` may have
    # been bfloat16): the export's own --dtype decides what precision is written.
    model_cfg, params, tokenizer = runs.load_run_base(dataclasses.replace(cfg, dtype="float32"))
    adapters = runs.restore_adapters(run_dir, cfg, model_cfg, checkpoint_step)
    step = adapters.step
    # SFT adapters first (GRPO trained on top of that merge), then GRPO's.
    merged = jax.device_get(lora_lib.merge(*adapters.policy(params)))
    log.info("merged LoRA (rank %d, step %d%s) of %s into %s", cfg.lora.rank, step,
             ", SFT + GRPO adapters" if adapters.sft is not None and adapters.grpo is not None
             else "", run_dir, model_cfg.name)
    return model_cfg, merged, tokenizer, step


# ---------------------------------------------------------------------------
# GGUF (llama.cpp / Ollama)

# Text whose encoding must agree before a checkpoint-based run borrows the embedded
# GGUF's vocabulary: space runs, newlines and tabs, control tokens, digits, non-Latin
# scripts and byte-fallback emoji.
_VOCAB_PROBES = ("Hello world", "  two  spaces,\n\n\ttabbed\n", "x = 3.14159; y = 12 + 7",
                 "<start_of_turn>user\nWhat is 6 * 7?<end_of_turn>\n<start_of_turn>model\n",
                 "naïve café, 東京, Привет 🤖")


def gguf_vocabulary_source(cfg: TrainConfig) -> Path | None:
    """The GGUF whose tokenizer.* keys a run's export copies: its base GGUF (--gguf, or
    the embedded model's file), or None for a checkpoint base (whose tokenizer is
    compared with the embedded vocabulary once loaded). A random base with the byte
    tokenizer has no GGUF vocabulary: an error."""
    if cfg.gguf is not None:
        return Path(cfg.gguf)
    if cfg.checkpoint is not None:
        return None
    if cfg.model == TINY.name:
        raise ExportError(f"--format gguf needs a Gemma vocabulary to copy, and model "
                          f"{cfg.model!r} is the random tiny model with a byte tokenizer; "
                          "use --format safetensors")
    return load.embedded_gguf_path()


def _check_same_vocabulary(tokenizer, reader, source: str) -> None:
    """A checkpoint's tokenizer.model may stand in for the GGUF vocabulary only if the
    two encode alike (Gemma 3 shares one vocabulary across sizes)."""
    from grpo_jax.tokenizer import Tokenizer

    if not hasattr(tokenizer, "model_proto"):
        raise ExportError(f"--format gguf needs a sentencepiece tokenizer, not {tokenizer!r}")
    theirs = Tokenizer.from_gguf(reader)
    if tokenizer.vocab_size != theirs.vocab_size or any(
            tokenizer.encode(t) != theirs.encode(t) for t in _VOCAB_PROBES):
        raise ExportError(f"the run's tokenizer ({getattr(tokenizer, 'source', tokenizer)}) "
                          f"does not encode as {source}'s vocabulary, which --format gguf "
                          "copies; train on a GGUF base (--gguf) to export one")


def export_gguf(run_dir: str | os.PathLike, *, out: str | os.PathLike,
                checkpoint_step: int | None = None, quant: str = "f16",
                overwrite: bool = False) -> Path:
    """Merge a run's LoRA into its base weights and write one GGUF file `out` for
    llama.cpp / Ollama (`quant` f16 or q8_0). Returns `out`."""

    if quant not in gguf_export.QUANTS:
        raise ExportError(f"--quant must be one of {', '.join(gguf_export.QUANTS)}, "
                          f"got {quant!r}")
    run_dir, out = Path(run_dir), Path(out)
    if out.suffix != ".gguf":
        raise ExportError(f"--out for --format gguf names the .gguf file to write, got {out}")
    # Every cheap check first, as export_merged does.
    cfg = runs.run_config(run_dir)
    runs.checkpoint_steps(run_dir, cfg, checkpoint_step)
    gguf_export.check_out_file(out, overwrite)
    vocab = gguf_vocabulary_source(cfg)
    if cfg.gguf is None:  # else the architecture is read from the file, at load
        gguf_export.check_llama_cpp_compatible(model_preset(cfg.model))

    model_cfg, merged, tokenizer, step = _merged_policy(run_dir, cfg, checkpoint_step)
    reader = weights.open_gguf(vocab if vocab is not None else load.embedded_gguf_path())
    if vocab is None:
        _check_same_vocabulary(tokenizer, reader, "the embedded Gemma 3 GGUF")
    gguf_export.write_gguf(out, merged, model_cfg, vocab=reader, quant=quant,
                           name=f"{model_cfg.name} {run_dir.resolve().name} step {step}",
                           metadata={"grpo_jax.run": str(run_dir), "grpo_jax.step": str(step)},
                           overwrite=overwrite)
    log.info("wrote %s (%s)", out, quant)
    return out


# ---------------------------------------------------------------------------
# CLI


@dataclasses.dataclass(frozen=True)
class ExportArgs:
    """Write a training run's base + LoRA merged weights as a Hugging Face checkpoint
    (--format safetensors) or a llama.cpp / Ollama GGUF file (--format gguf)."""

    run_dir: Path
    """A training run's --output-dir (its config.json and checkpoints/)."""
    out: Path
    """safetensors: output directory (model.safetensors, config.json,
    generation_config.json and, for sentencepiece tokenizers, tokenizer.model and
    tokenizer_config.json). gguf: the .gguf file to write."""
    step: int | None = None
    """Checkpoint step to export (default: the latest)."""
    format: str = "safetensors"
    """safetensors (Hugging Face) or gguf (llama.cpp, Ollama)."""
    dtype: str | None = None
    """safetensors only: weight dtype written, float32 (default) or bfloat16."""
    quant: str | None = None
    """gguf only: matrix type written, f16 (default) or q8_0 (norms stay float32)."""
    overwrite: bool = False
    """Replace an existing non-empty --out directory (or, for gguf, file)."""


def _export(args: ExportArgs) -> Path:
    if args.format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    if args.format == "gguf":
        if args.dtype is not None:
            raise ExportError("--dtype applies to --format safetensors; for gguf use "
                              "--quant f16|q8_0")
        return export_gguf(args.run_dir, out=args.out, checkpoint_step=args.step,
                           quant=args.quant or "f16", overwrite=args.overwrite)
    if args.quant is not None:
        raise ExportError("--quant applies to --format gguf only; for safetensors use "
                          "--dtype float32|bfloat16")
    return export_merged(args.run_dir, out_dir=args.out, checkpoint_step=args.step,
                         dtype=args.dtype or "float32", overwrite=args.overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    args = tyro.cli(ExportArgs, args=argv)
    return run_cli(lambda: _export(args))


if __name__ == "__main__":
    sys.exit(main())
