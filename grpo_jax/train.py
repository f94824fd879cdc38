"""Training: `python -m grpo_jax.train [--preset NAME] [--field value ...]`.

The loop over the phases (`train`, `_train_loop`): SFT steps (`sft.sft_step`), the
merge of the SFT adapters into the base weights at the boundary, then GRPO steps
(`rollout.grpo_step`: sample -> host rewards and advantages -> one upload ->
reference pass and updates -> metrics), with checkpoints, metrics.jsonl /
samples.jsonl, progress and the evaluation columns; restore; the CLI. Randomness:
the LoRA init and the sampling keys are separate streams of `seed` (`run_keys`);
step k samples with fold_in(sampling key, k), so a resumed run repeats exactly what
an uninterrupted one does.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax

from grpo_jax import (data, dry_run, evaluate, fileio, memory, presets, rewards, rollout, runs,
                      sharding, sft, stop_strings, tools, update)
from grpo_jax.cli import run_cli
from grpo_jax.checkpoint import Checkpointer
from grpo_jax.context import StepContext
from grpo_jax.config import TrainConfig
from grpo_jax.model.config import ModelConfig
from grpo_jax.compiles import CompileCounter
from grpo_jax.metrics import MetricsLogger, Progress, format_duration
from grpo_jax.model import gemma3, load, lora as lora_lib

log = logging.getLogger("grpo_jax.train")


class TrainingError(RuntimeError):
    pass


# ---------------------------------------------------------------------------
# Pieces


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(LoRA init key, sampling key): two independent streams of `seed`.

    Both derive from split(key(seed)), so no LoRA leaf's init key (split of the
    first) is ever a step's sampling key (fold_in of the second).
    """
    lora_key, sampling_key = jax.random.split(jax.random.key(seed))
    return lora_key, sampling_key


def step_functions(cfg: TrainConfig, model_cfg: ModelConfig,
                   plan: sharding.MeshPlan) -> update.StepFunctions:
    return update.build_update(model_cfg, cfg.grpo, cfg.optimizer, cfg.total_updates,
                               cfg.sampler.temperature, update.GRPOLoss(cfg.grpo), plan)


def sft_step_functions(cfg: TrainConfig, model_cfg: ModelConfig,
                       plan: sharding.MeshPlan) -> update.StepFunctions:
    """The SFT phase's update: masked NLL, its own optimizer schedule over sft.steps."""
    return update.build_update(model_cfg, cfg.grpo, cfg.sft.optimizer(cfg.optimizer),
                               cfg.sft.steps, 1.0, update.NLLLoss(), plan)


def run_plan(cfg: TrainConfig) -> sharding.MeshPlan:
    """The run's device mesh (one process on one device: `sharding.local_plan`)."""
    if cfg.mesh.size == 1 and jax.process_count() == 1:
        return sharding.local_plan()
    return sharding.plan_for(cfg.mesh)


def place_state(plan: sharding.MeshPlan, fns: update.StepFunctions, model_cfg,
                state: update.TrainState) -> update.TrainState:
    """Adapters and optimizer state laid out by the rules (restores then read into the
    same layout)."""
    return sharding.put_tree(state, update.state_shardings(plan, model_cfg, fns.optimizer,
                                                             state.lora))


# ---------------------------------------------------------------------------
# The loop


class NullLogger:
    """What processes other than 0 log to: nothing (process 0 writes the run's files)."""

    def log(self, step, metrics):
        return metrics

    def log_samples(self, step, rows):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) SFT then GRPO as configured, evaluating base, SFT-only and the
    trained policy on held-out problems; -> the last step's metrics."""
    out_dir = Path(cfg.output_dir)
    # Everything the run will need is resolved before its first step, and every check
    # that can refuse comes before anything in the run directory changes.
    runs.check_resume_config(out_dir, cfg)
    sharding.initialize_distributed(cfg.distributed)
    sharding.check_run(cfg, dry_run.run_model_config(cfg), jax.device_count())
    rewards.check_rewards(cfg.rewards)
    for name in cfg.sampler.tools:
        tools.get_tool(name)  # an unknown tool is refused before anything is loaded
    problems = data.load_problems(cfg.data, "train", need_solution=cfg.sft.steps > 0)
    held_out = evaluate.eval_problems(cfg) if cfg.eval_problems else []
    fileio.check_writable(out_dir)
    ckpt = Checkpointer(out_dir, fingerprint=runs.run_fingerprint(cfg), keep=cfg.keep_checkpoints)
    try:
        ckpt.check_compatible()  # before any heavy loading: a foreign directory fails fast
        base = runs.load_run_base(cfg)
        if jax.process_index() == 0:
            runs.write_config_once(out_dir, cfg)
        plan = run_plan(cfg)
        evals = evaluate.EvalFile(cfg, out_dir, held_out, plan=plan) if held_out else None
        metrics = _train_loop(cfg, ckpt, base, problems, evals, plan)
    finally:
        ckpt.close()
    if evals is not None and jax.process_index() == 0:
        print(evals.table())
    return metrics


def _restore(cfg: TrainConfig, ckpt: Checkpointer, sft_state: update.TrainState | None,
             grpo_state: update.TrainState) -> tuple[int, dict, int]:
    """The newest good checkpoint's step, items and data position (0, {} and 0
    without one; damaged newer ones are set aside); its recorded data position must
    be one this config can reach at that step."""
    def template(step: int) -> dict:
        state = sft_state if cfg.sft.steps and cfg.is_sft_step(step) else grpo_state
        items = {"lora": state.lora, "opt_state": state.opt_state}
        return {"sft_lora": sft_state.lora, **items} if "sft_lora" in runs.checkpoint_items(
            cfg, step) else items

    restored = ckpt.restore_latest(template)
    if restored is None:
        return 0, {}, 0
    for damaged in restored.skipped:  # out of the kept ones, and of their steps' next saves
        log.warning("moved damaged checkpoint %d to %s", damaged.step,
                    ckpt.set_aside(damaged.step))
    position = restored.meta.get("data_position")
    least, most = cfg.data_position_bounds(restored.step)
    if position is not None and not least <= position <= most:
        expected = f"{least}" if least == most else f"{least}..{most}"
        raise runs.ResumeMismatch(
            f"checkpoint {restored.step} in {ckpt.directory} was saved at data position "
            f"{position}, but this config puts step {restored.step} at {expected} "
            f"(sft.batch_size={cfg.sft.batch_size}, grpo.num_prompts={cfg.grpo.num_prompts}, "
            f"{cfg.rounds_per_step} sampling round(s) a step at most); use the run's own "
            "config.json")
    log.info("resuming from step %d in %s", restored.step, cfg.output_dir)
    # Checkpoints from before dynamic sampling recorded no position of their own choosing.
    return restored.step, restored.state, least if position is None else position


def _train_loop(cfg: TrainConfig, ckpt: Checkpointer, base: load.LoadedModel, problems,
                evals: evaluate.EvalFile | None, plan: sharding.MeshPlan) -> dict:
    """SFT steps 1..sft.steps, then GRPO steps to total_steps, from the newest checkpoint.

    At the boundary the SFT adapters are merged into the base weights: the merged
    weights are GRPO's starting point and its KL reference (LoRA off), and GRPO trains
    a fresh LoRA on them. GRPO-phase checkpoints keep the SFT adapters ('sft_lora'),
    so a resume rebuilds the same merged weights.
    """
    out_dir, sft_steps = Path(cfg.output_dir), cfg.sft.steps
    model_cfg, params, tokenizer = base
    del base  # after the merge the base weights are not held twice
    params = sharding.put_tree(params, gemma3.param_shardings(plan, model_cfg))
    lora_key, sampling_key = run_keys(cfg.seed)
    fns = step_functions(cfg, model_cfg, plan)
    grpo_state = place_state(plan, fns, model_cfg, fns.init_state(
        lora_lib.init_lora(model_cfg, cfg.lora, lora_key)))
    sft_fns = sft_step_functions(cfg, model_cfg, plan) if sft_steps else None
    sft_state = place_state(plan, sft_fns, model_cfg, sft_fns.init_state(lora_lib.init_lora(
        model_cfg, cfg.lora, jax.random.fold_in(lora_key, 1)))) if sft_steps else None
    # Checkpoints restore into the layout of these templates (sharded on a mesh).
    start, restored, restored_position = _restore(cfg, ckpt, sft_state, grpo_state)
    shapes, sft_problems = sft.run_shapes(cfg, tokenizer, problems)
    sft_ctx = StepContext(cfg, model_cfg, tokenizer, sft_fns, sft_problems, shapes,
                          plan) if sft_steps else None
    grpo_ctx = StepContext(cfg, model_cfg, tokenizer, fns, problems, shapes, plan,
                           sampling_key, stop_strings.stop_table(
                               tokenizer, cfg.sampler.stop_strings, model_cfg.vocab_size),
                           tools.toolbox(tokenizer, cfg.sampler, model_cfg.vocab_size))

    def evaluate_column(column: str, step: int, lora) -> None:
        if evals is not None and not evals.is_current(column, step):
            progress.note(f"evaluating {column} (step {step}) on {len(evals.problems)} problems")
            began = time.monotonic()
            figures = evals.add(column, step, params, lora, tokenizer, model_cfg)
            progress.note(f"evaluated {column}: " + ", ".join(
                f"{k.removesuffix('_accuracy')} {figures[k]:.1%}" for k in
                ("format_accuracy", "exact_accuracy") if k in figures)
                + f" ({format_duration(time.monotonic() - began)})")

    metrics: dict[str, Any] = {}
    skips_in_a_row = 0
    main = jax.process_index() == 0  # only process 0 writes logs, metrics, the bar
    with (MetricsLogger(out_dir, tensorboard=cfg.tensorboard, resume_step=start) if main
          else NullLogger()) as logger, \
            Progress(total=cfg.total_steps, initial=start,
                     enabled=None if main else False) as progress:

        compiles = CompileCounter()

        def finish_step(step: int, metrics: dict, samples=(), items=None,
                        position: int | None = None) -> None:
            nonlocal skips_in_a_row
            metrics.update(compiles.take())  # a step after the first few should compile nothing
            logger.log(step, metrics)
            logger.log_samples(step, samples)
            progress.update(metrics, phase="sft" if cfg.is_sft_step(step) else "grpo")
            skips_in_a_row = skips_in_a_row + 1 if metrics["skipped"] else 0
            if cfg.max_consecutive_skips and skips_in_a_row >= cfg.max_consecutive_skips:
                raise TrainingError(f"{skips_in_a_row} steps in a row had a non-finite loss or "
                                    f"gradient (last at step {step}); stopping")
            # The SFT -> GRPO boundary is always saved: GRPO starts from it.
            if step % cfg.save_every == 0 or step in (sft_steps, cfg.total_steps):
                ckpt.save(step, items, {"data_position": cfg.data_position(step)
                                        if position is None else position,
                                        "phase": "sft" if cfg.is_sft_step(step) else "grpo"})

        evaluate_column("base", 0, None)
        compiles.take()  # the evaluation's programs are not the first step's
        sft_lora = None
        if sft_steps:
            if start < sft_steps:
                progress.note(f"SFT: steps {start + 1}-{sft_steps} of {cfg.total_steps}")
                if start:
                    sft_state = update.TrainState(restored["lora"], restored["opt_state"])
                for step in range(start + 1, sft_steps + 1):
                    sft_state, metrics = sft.sft_step(sft_ctx, params, sft_state, step)
                    finish_step(step, metrics, items={"lora": sft_state.lora,
                                                      "opt_state": sft_state.opt_state})
                sft_lora = sft_state.lora
            else:
                sft_lora = restored["lora" if start == sft_steps else "sft_lora"]
            evaluate_column("sft", sft_steps, sft_lora)
            compiles.take()
            params = sharding.put_tree(lora_lib.merge(params, sft_lora),
                                       gemma3.param_shardings(plan, model_cfg))
        if start > sft_steps:
            grpo_state = update.TrainState(restored["lora"], restored["opt_state"])
        state = grpo_state
        # The GRPO stream position is state: with dynamic sampling a step may use up
        # more than num_prompts problems, so it comes from the checkpoint.
        position = restored_position if start > sft_steps else cfg.data_position(sft_steps)
        if max(start, sft_steps) < cfg.total_steps:
            progress.note(f"GRPO: steps {max(start, sft_steps) + 1}-{cfg.total_steps} of "
                          f"{cfg.total_steps}")
        for step in range(max(start, sft_steps) + 1, cfg.total_steps + 1):
            state, metrics, samples, position = rollout.grpo_step(grpo_ctx, params, state,
                                                                  step, position)
            if evals is not None and cfg.eval_every and step % cfg.eval_every == 0 \
                    and step < cfg.total_steps:
                figures, _ = evaluate.evaluate_model(params, state.lora, tokenizer,
                                                     evals.problems, model_cfg,
                                                     **evaluate.eval_options(cfg), plan=plan)
                metrics.update({f"eval/{k}": v for k, v in figures.items()
                                if k.endswith("_accuracy")})
            items = {"lora": state.lora, "opt_state": state.opt_state}
            finish_step(step, metrics, samples,
                        {"sft_lora": sft_lora, **items} if sft_lora is not None else items,
                        position)
    evaluate_column("trained", cfg.total_steps, state.lora)
    return metrics


# ---------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    """`--dry-run` hands the whole command line to `python -m grpo_jax.dry_run`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--dry-run" in argv:
        return dry_run.main([a for a in argv if a != "--dry-run"])
    return run_cli(lambda: train(presets.parse_run_config(argv)), TrainingError)


if __name__ == "__main__":
    memory.keep_freed_memory()  # restarts the process once (grpo_jax/memory.py)
    sys.exit(main())
