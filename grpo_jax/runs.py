"""A training run's directory: its config.json (written once, when the run starts),
checkpoints and eval.json. Readers (`evaluate`, `export`) never write to it, so they
are safe beside a run still training."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import NamedTuple

import jax

from grpo_jax import data
from grpo_jax.checkpoint import Checkpointer
from grpo_jax.config import TrainConfig, config_from_dict
from grpo_jax.fileio import atomic_write_text
from grpo_jax.model import load, lora as lora_lib

CONFIG_FILE = "config.json"
EVAL_FILE = "eval.json"
# config.json and eval.json record the data source's versions under this key.
DATA_SOURCE_KEY = "data_source"


# TrainConfig fields (dotted paths) that a resumed run may change: they do not change
# what a step computes. Evaluation, logging and checkpointing settings, and the
# memory/speed knobs whose results agree to float rounding (micro-batches add up to
# the whole batch; shared prompts and log-prob chunks compute the same numbers).
# Every other field is the run's identity: a resume that changes it is refused.
RESUMABLE_FIELDS = frozenset({
    "preset", "output_dir", "save_every", "keep_checkpoints", "log_samples",
    "max_consecutive_skips", "eval_problems", "eval_every", "eval_max_new_tokens",
    "eval_batch_size", "tensorboard", "data.eval_dataset", "data.num_eval", "data.eval_seed",
    "grpo.micro_batch", "grpo.logprob_chunk", "grpo.share_prompt", "attention", "matmul",
    # Where it runs: a mesh or host count computes the same steps (to float rounding).
    "mesh.data", "mesh.fsdp", "mesh.tensor", "distributed.coordinator",
    "distributed.num_processes", "distributed.process_id", "distributed.auto",
})
# Fields config.json files of earlier versions hold that are no longer the run's (the
# dry run's options moved to its own command): read back without them.
RETIRED_FIELDS = ("dry_run", "topology", "dry_run_json", "dry_run_attention")


def flat_fields(cfg) -> dict[str, object]:
    """A (nested) config dataclass as {"dotted.path": value}, tuples as lists (the
    form config.json holds)."""
    out: dict[str, object] = {}

    def walk(prefix, value):
        for key, v in value.items():
            if isinstance(v, dict):
                walk(f"{prefix}{key}.", v)
            else:
                out[prefix + key] = v

    walk("", json.loads(json.dumps(dataclasses.asdict(cfg))))
    return out


def changed_identity_fields(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """The fields outside RESUMABLE_FIELDS whose values differ, as "name (old -> new)"."""
    a, b = flat_fields(saved), flat_fields(new)
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in sorted(set(a) | set(b))
            if k not in RESUMABLE_FIELDS and a.get(k) != b.get(k)]


def run_fingerprint(cfg: TrainConfig) -> dict:
    """What a checkpoint's state means: resuming into anything else is refused."""
    return {"model": cfg.model, "checkpoint": cfg.checkpoint, "gguf": cfg.gguf,
            "lora": dataclasses.asdict(cfg.lora)}


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
    values = json.loads(path.read_text())
    values.pop(DATA_SOURCE_KEY, None)  # a record beside the config, not a field of it
    for name in RETIRED_FIELDS:
        values.pop(name, None)
    return config_from_dict(TrainConfig, values)


def check_resume_config(run_dir: str | os.PathLike, cfg: TrainConfig) -> None:
    """Refuse, with one line naming the fields, to continue the run in `run_dir` with
    a config that changes what its steps compute (see RESUMABLE_FIELDS)."""
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
        record = {**dataclasses.asdict(cfg), DATA_SOURCE_KEY: data.source_versions(cfg.data)}
        atomic_write_text(path, json.dumps(record, indent=2))


def load_run_base(cfg: TrainConfig) -> load.LoadedModel:
    """The base model a run trains on. The random `tiny` base draws from seed + 1, a
    root of its own (the run's LoRA init and sampling streams split from seed)."""
    loaded = load.load_base(cfg.model, checkpoint=cfg.checkpoint, gguf=cfg.gguf,
                            dtype=cfg.dtype, matmul=cfg.matmul, seed=cfg.seed + 1)
    return loaded._replace(cfg=dataclasses.replace(loaded.cfg, attention_impl=cfg.attention))


def checkpoint_steps(run_dir: str | os.PathLike, cfg: TrainConfig,
                     step: int | None = None) -> list[int]:
    """The run's complete checkpoint steps; an error when there are none, or when
    `step` is given and is not one of them."""
    ckpt = Checkpointer(run_dir, fingerprint=run_fingerprint(cfg), read_only=True)
    try:
        steps = ckpt.all_steps()
        if steps and step is not None:
            ckpt.require_step(step)
    finally:
        ckpt.close()
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {run_dir} (no complete step)")
    return steps


def checkpoint_items(cfg: TrainConfig, step: int) -> tuple[str, ...]:
    """Item names of checkpoint `step`. In the SFT phase 'lora' is the SFT adapters
    (with 'opt_state', their optimizer); in the GRPO phase 'lora' is the GRPO
    adapters, and 'sft_lora' the SFT ones merged under them (when the run has SFT)."""
    if cfg.sft.steps and not cfg.is_sft_step(step):
        return ("sft_lora", "lora", "opt_state")
    return ("lora", "opt_state")


class Adapters(NamedTuple):
    """A checkpoint's adapters: `sft` (None without SFT) and `grpo` (None before the
    GRPO phase)."""

    step: int
    sft: lora_lib.LoraWeights | None
    grpo: lora_lib.LoraWeights | None

    def policy(self, base_params):
        """(params, lora) of the policy this checkpoint holds: the SFT adapters are
        merged into the base (GRPO's reference) and the GRPO ones stay on top."""
        if self.grpo is None:
            return base_params, self.sft
        if self.sft is None:
            return base_params, self.grpo
        return lora_lib.merge(base_params, self.sft), self.grpo


def restore_adapters(run_dir: str | os.PathLike, cfg: TrainConfig, model_cfg,
                     step: int | None = None) -> Adapters:
    """The adapters of the run's checkpoint `step` (default: the newest that verifies;
    damaged newer ones are skipped with a warning), described by shapes alone: no
    optimizer state is read. The checkpoint's fingerprint must match `cfg`'s; a
    damaged `step` asked for is an error."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    lora = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        lora_lib.abstract_lora(model_cfg, cfg.lora))

    def abstract(at: int) -> dict:
        return {name: lora for name in checkpoint_items(cfg, at) if name != "opt_state"}

    ckpt = Checkpointer(run_dir, fingerprint=run_fingerprint(cfg), read_only=True)
    try:
        # restore checks that `step` exists; restore_latest says None when none does.
        restored = (ckpt.restore_latest(abstract) if step is None
                    else ckpt.restore(step, abstract(step)))
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoints in {run_dir} (no complete step)")
    items, at = restored.state, restored.step
    if cfg.sft.steps and cfg.is_sft_step(at):
        return Adapters(at, items["lora"], None)
    return Adapters(at, items.get("sft_lora"), items["lora"])


def restore_lora(run_dir: str | os.PathLike, cfg: TrainConfig, model_cfg,
                 step: int | None = None):
    """(LoraWeights, step) of a run without SFT (see restore_adapters for one with)."""
    adapters = restore_adapters(run_dir, cfg, model_cfg, step)
    if adapters.sft is not None:
        raise ValueError(f"{run_dir} trained SFT adapters too: use restore_adapters")
    return adapters.grpo, adapters.step


def eval_file(split: str = "eval", num_problems: int | None = None) -> str:
    """<split>.json: eval.json for the held-out templates (the headline),
    eval_same_template.json for new problems of the training templates; an evaluation
    on another number of problems than the run's own (`num_problems` given) is
    <split>_n<N>.json, so it never replaces the run's own file."""
    stem = split + ("" if num_problems is None else f"_n{num_problems}")
    return EVAL_FILE if stem == "eval" else f"{stem}.json"


def read_eval(run_dir: str | os.PathLike, name: str = EVAL_FILE) -> dict:
    """The run's evaluation file `name` ({} when absent or unreadable)."""
    try:
        result = json.loads((Path(run_dir) / name).read_text())
    except (OSError, ValueError):
        return {}
    return result if isinstance(result, dict) else {}


def write_eval(run_dir: str | os.PathLike, result: dict, name: str = EVAL_FILE) -> None:
    """The evaluation file `name`, atomically: a kill leaves the previous file or the new
    one."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(run_dir) / name, json.dumps(result, indent=1))
