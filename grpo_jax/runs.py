"""A training run's directory: its config.json (written once, when the run starts),
checkpoints and eval.json. Readers (`evaluate`, `export`) never write to it, so they
are safe beside a run still training."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax

from grpo_jax.checkpoint import Checkpointer
from grpo_jax.config import TrainConfig, changed_identity_fields, config_from_dict
from grpo_jax.fileio import atomic_write_text
from grpo_jax.model import load, lora as lora_lib

CONFIG_FILE = "config.json"
EVAL_FILE = "eval.json"


class ResumeMismatch(ValueError):
    """A restart whose configuration would not continue the run in its directory."""


def run_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The TrainConfig a run was trained with (its config.json)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training run's output dir?")
    return config_from_dict(TrainConfig, json.loads(path.read_text()))


def check_resume_config(run_dir: str | os.PathLike, cfg: TrainConfig) -> None:
    """Refuse, with one line naming the fields, to continue the run in `run_dir` with
    a config that changes what its steps compute (see config.RESUMABLE_FIELDS)."""
    if not (Path(run_dir) / CONFIG_FILE).is_file():
        return
    changed = changed_identity_fields(run_config(run_dir), cfg)
    if changed:
        raise ResumeMismatch(
            f"{run_dir} holds a run with other settings; resuming it would change "
            f"{', '.join(changed)}. Pass the run's own values (its {CONFIG_FILE}) or use "
            "another --output-dir")


def write_config_once(run_dir: str | os.PathLike, cfg: TrainConfig) -> None:
    """config.json records the run as it started: written by its first start only."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(dataclasses.asdict(cfg), indent=2))


def load_run_base(cfg: TrainConfig) -> load.LoadedModel:
    """The base model a run trains on. The random `tiny` base draws from seed + 1, a
    root of its own (the run's LoRA init and sampling streams split from seed)."""
    return load.load_base(cfg.model, checkpoint=cfg.checkpoint, gguf=cfg.gguf, dtype=cfg.dtype,
                          seed=cfg.seed + 1)


def checkpoint_steps(run_dir: str | os.PathLike, cfg: TrainConfig,
                     step: int | None = None) -> list[int]:
    """The run's complete checkpoint steps; an error when there are none, or when
    `step` is given and is not one of them."""
    ckpt = Checkpointer(run_dir, fingerprint=cfg.fingerprint, read_only=True)
    try:
        steps = ckpt.all_steps()
        if steps and step is not None:
            ckpt.require_step(step)
    finally:
        ckpt.close()
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {run_dir} (no complete step)")
    return steps


def restore_lora(run_dir: str | os.PathLike, cfg: TrainConfig, model_cfg,
                 step: int | None = None):
    """(LoraWeights, step) from the run's checkpoint `step` (default: the newest that
    verifies; damaged newer ones are skipped with a warning), described by shapes
    alone: no optimizer state is read. The checkpoint's fingerprint must match
    `cfg`'s; a damaged `step` asked for is an error."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    lora = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        lora_lib.abstract_lora(model_cfg, cfg.lora))
    ckpt = Checkpointer(run_dir, fingerprint=cfg.fingerprint, read_only=True)
    try:
        # restore checks that `step` exists; restore_latest says None when none does.
        restored = (ckpt.restore_latest({"lora": lora}) if step is None
                    else ckpt.restore(step, {"lora": lora}))
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoints in {run_dir} (no complete step)")
    return restored.state["lora"], restored.step


def write_eval(run_dir: str | os.PathLike, result: dict) -> None:
    """eval.json, atomically: a kill leaves the previous file or the new one."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(run_dir) / EVAL_FILE, json.dumps(result, indent=1))


def eval_is_current(run_dir: str | os.PathLike, step: int) -> bool:
    """Whether eval.json exists and evaluates checkpoint `step`."""
    path = Path(run_dir) / EVAL_FILE
    try:
        return json.loads(path.read_text()).get("step") == step
    except (OSError, ValueError, AttributeError):
        return False
