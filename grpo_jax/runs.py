"""Reading a training run's directory (its config.json and checkpoints) without
writing to it: what `evaluate` and `export` need, safe beside a run still training."""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax

from grpo_jax.config import ModelConfig, TrainConfig


def run_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The TrainConfig a run was trained with (its config.json)."""
    from grpo_jax.config import config_from_dict

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training run's output dir?")
    return config_from_dict(TrainConfig, json.loads(path.read_text()))


def checkpoint_steps(run_dir: str | os.PathLike, cfg: TrainConfig,
                     step: int | None = None) -> list[int]:
    """The run's complete checkpoint steps; an error when there are none, or when
    `step` is given and is not one of them."""
    from grpo_jax.checkpoint import Checkpointer

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


def restore_lora(run_dir: str | os.PathLike, cfg: TrainConfig, model_cfg: ModelConfig,
                 step: int | None = None):
    """(LoraWeights, step) from the run's checkpoint `step` (default: the latest).

    Restored into the structure training saves ({"lora", "opt_state"}) described by
    shapes alone; the checkpoint's fingerprint must match `cfg`'s.
    """
    from grpo_jax.checkpoint import Checkpointer
    from grpo_jax.model import lora as lora_lib
    from grpo_jax.train import make_optimizer, num_updates

    steps = checkpoint_steps(run_dir, cfg)
    step = steps[-1] if step is None else step
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    lora = lora_lib.abstract_lora(model_cfg, cfg.lora)
    opt_state = jax.eval_shape(make_optimizer(cfg.optimizer, num_updates(cfg)).init, lora)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            {"lora": lora, "opt_state": opt_state})
    ckpt = Checkpointer(run_dir, fingerprint=cfg.fingerprint, read_only=True)
    try:
        restored = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    return restored.state["lora"], restored.step
