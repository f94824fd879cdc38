"""Branch a run at its SFT -> GRPO boundary: the same SFT model, other GRPO settings.

Recipe comparisons of GRPO settings (reward weights, dynamic sampling, group size,
learning rate) should start from one SFT model, so that the GRPO setting is the only
difference, and need not pay for SFT again. This copies SOURCE's files up to its SFT
boundary checkpoint into NEW_DIR (checkpoints after it, metrics and samples rows
after it, and every evaluation column after it are left behind), writes NEW_DIR's
config.json with the flags given, and runs the GRPO phase there; the evaluation
files keep the base and SFT-only columns, so `evaluate --run-dir NEW_DIR` computes
only the new policy's column. Flags that would change the SFT phase or what was
checkpointed (model, LoRA, SFT, data, seed) are refused.

    python scripts/branch_grpo.py runs/cpu-270m runs/answer-only \\
        --rewards.functions match_format_exactly 3 match_format_approximately 1 ...
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import tyro

from grpo_jax import runs, train
from grpo_jax.cli import run_cli
from grpo_jax.config import TrainConfig
from grpo_jax.fileio import atomic_write_text
from grpo_jax.validation import deferred_validation, validate

# Fields a branch may change: they act after the SFT boundary only.
GRPO_PHASE = ("steps", "grpo.", "rewards.", "optimizer.", "sampler.", "output_dir", "preset",
              "save_every", "eval_every", "log_samples", "tensorboard")


def branch_config(source: TrainConfig, flags: list[str], new_dir: Path) -> TrainConfig:
    with deferred_validation():
        cfg = tyro.cli(TrainConfig, default=dataclasses.replace(
            source, output_dir=str(new_dir)), args=flags)
    validate(cfg)
    before = runs.flat_fields(source)
    changed = [k for k, v in runs.flat_fields(cfg).items()
               if before.get(k) != v and not k.startswith(GRPO_PHASE)]
    if changed:
        raise ValueError(f"a branch keeps the SFT phase; these flags change it: "
                         f"{', '.join(changed)}")
    if not source.sft.steps:
        raise ValueError("the source run has no SFT phase to branch from")
    return cfg


def copy_to_boundary(source_dir: Path, new_dir: Path, boundary: int) -> None:
    """SOURCE's files as they stood after step `boundary`."""
    if new_dir.exists():
        raise ValueError(f"{new_dir} exists; a branch starts in a new directory")
    checkpoint = source_dir / "checkpoints" / str(boundary)
    if not checkpoint.is_dir():
        raise ValueError(f"{source_dir} has no checkpoint of its SFT boundary (step {boundary})")
    (new_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, new_dir / "checkpoints" / str(boundary))
    for name in ("metrics.jsonl", "samples.jsonl"):  # the trainer drops later rows itself
        if (source_dir / name).exists():
            shutil.copy2(source_dir / name, new_dir / name)
    for path in source_dir.glob("eval*.json"):
        result = runs.read_eval(source_dir, path.name)
        for key in ("trained", "step", "comparison"):
            result.pop(key, None)
        for key in ("steps", "records"):
            result.get(key, {}).pop("trained", None)
        runs.write_eval(new_dir, result, path.name)


def branch(source_dir: Path, new_dir: Path, flags: list[str]) -> dict:
    source = runs.run_config(source_dir)
    cfg = branch_config(source, flags, new_dir)
    copy_to_boundary(source_dir, new_dir, source.sft.steps)
    record = {**dataclasses.asdict(cfg), runs.DATA_SOURCE_KEY:
              json.loads((source_dir / runs.CONFIG_FILE).read_text())[runs.DATA_SOURCE_KEY]}
    atomic_write_text(new_dir / runs.CONFIG_FILE, json.dumps(record, indent=2))
    return train.train(cfg)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a run directory with an SFT phase")
    parser.add_argument("new_dir", type=Path, help="the branch's run directory (new)")
    args, flags = parser.parse_known_args(argv)
    # As the train CLI: platforms, logging, the compilation cache, one-line errors.
    return run_cli(lambda: branch(args.source, args.new_dir, flags), train.TrainingError)

if __name__ == "__main__":
    sys.exit(main())
