"""GRPO training: `python -m grpo_jax.train [--preset NAME] [--field value ...]`.

One step, top to bottom (`run_step`, each arrow one call):
    data.batch_at               -> B problems at the stream position (step - 1) * B
    sampler.sample              -> B x G completions from base + LoRA (prefill once per prompt)
    rewards.score_completions   -> total and per-function rewards
    step.teacher_forced_batch   -> the rollout as the trainer reads it
    fns.batch_logprobs(LoRA off) -> reference log-probs (when beta > 0)
    completion_advantages       -> advantages within each group of G
    fns.update x mu             -> clipped surrogate + beta KL, grads w.r.t. LoRA only, AdamW
    step_metrics                -> one metrics row
The loop (`train`) adds checkpoints, metrics.jsonl / samples.jsonl and the final
evaluation. Randomness: the LoRA init and the sampling keys are separate streams
of `seed` (`run_keys`); step k samples with fold_in(sampling key, k), so a resumed
run repeats exactly what an uninterrupted one does.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from grpo_jax import (data, evaluate, fileio, grpo, rewards, run_cli, runs, sampler,
                      step as step_lib, stop_strings)
from grpo_jax.checkpoint import Checkpointer
from grpo_jax.config import (ModelConfig, TrainConfig, deferred_validation, train_preset,
                             validate)
from grpo_jax.metrics import MetricsLogger, Progress
from grpo_jax.model import load, lora as lora_lib

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


def step_functions(cfg: TrainConfig, model_cfg: ModelConfig) -> step_lib.StepFunctions:
    return step_lib.build_step(model_cfg, cfg.grpo, cfg.optimizer, cfg.total_updates,
                               cfg.sampler.temperature)


def step_problems(cfg: TrainConfig, tokenizer, problems, step: int):
    """The problems of `step` (1-based) and their prompts, left-padded to a bucket."""
    batch = data.batch_at(problems, cfg.data.shuffle_seed, (step - 1) * cfg.grpo.num_prompts,
                          cfg.grpo.num_prompts)
    tokens, mask = sampler.left_pad(
        data.encode_prompts(tokenizer, batch, cfg.data.prompt_style, cfg.data.prefill),
        multiple=cfg.sampler.prompt_bucket)
    return batch, tokens, mask


def completion_advantages(cfg: TrainConfig, total_rewards: np.ndarray,
                          batch: step_lib.Batch) -> tuple[np.ndarray, np.ndarray | None]:
    """Group advantages of the rewards -> (advantages, KL penalty per completion or None).

    With kl_estimator k1 the KL is a penalty on the reward (beta * the completion's
    summed log-ratio of sampler to reference), not a loss term.
    """
    g = cfg.grpo
    penalty = None
    if g.kl_estimator == "k1" and g.beta > 0:
        penalty = np.asarray(grpo.kl_reward_penalty(batch.sample_logprobs, batch.ref_logprobs,
                                                    batch.completion_mask, g.beta))
        total_rewards = total_rewards - penalty
    advantages = grpo.group_advantages(total_rewards.astype(np.float32), g.group_size,
                                       scale_by_std=g.scale_advantages_by_std)
    return np.asarray(advantages), penalty


def run_step(cfg: TrainConfig, fns: step_lib.StepFunctions, model_cfg: ModelConfig, params,
             tokenizer, state: step_lib.TrainState, problems, step: int,
             sampling_key: jax.Array):
    """Sample, score, update. -> state, metrics dict, sample rows."""
    g = cfg.grpo
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return clock[-1] - clock[-2]

    chosen, prompt_tokens, prompt_mask = step_problems(cfg, tokenizer, problems, step)
    rollout = sampler.sample(params, prompt_tokens, prompt_mask,
                             jax.random.fold_in(sampling_key, step), cfg=model_cfg,
                             sampling=cfg.sampler, group=g.group_size, lora=state.lora,
                             stop_table=stop_strings.stop_table(
                                 tokenizer, cfg.sampler.stop_strings, model_cfg.vocab_size))
    rollout = jax.device_get(rollout)
    sample_s = lap()

    # The rewards read the answer as the model wrote it: the prefill, then its completion.
    texts = [cfg.data.prefill + t for t in
             sampler.decode_completions(tokenizer, rollout, cfg.sampler.stop_strings)]
    answers = [p.answer for p in chosen for _ in range(g.group_size)]
    total, per_function = rewards.score_completions(texts, answers, cfg.rewards)
    batch = step_lib.teacher_forced_batch(prompt_tokens, prompt_mask, rollout.tokens,
                                          rollout.lengths, g.group_size,
                                          rollout.sampling_logprobs)
    score_s = lap()

    if g.beta > 0:
        batch = batch.replace(ref_logprobs=fns.batch_logprobs(params, None, batch))
    advantages, kl_penalty = completion_advantages(cfg, total, batch)
    batch = batch.replace(advantages=jnp.asarray(advantages))
    # mu = 1 is on-policy: old = stop_gradient(current) inside the loss, no extra pass.
    # mu > 1 fixes old before the first update.
    if g.num_iterations > 1:
        batch = batch.replace(old_logprobs=fns.batch_logprobs(params, state.lora, batch))
    jax.block_until_ready(batch)
    logprobs_s = lap()

    updates = []
    for _ in range(g.num_iterations):
        state, m = fns.update(params, state, batch)
        updates.append(m)
    updates = jax.device_get(updates)
    update_s = lap()

    metrics = step_metrics(total, per_function, texts, answers, rollout, updates,
                           kl_penalty, elapsed=clock[-1] - clock[0])
    metrics.update({"time/sample_s": sample_s, "time/score_s": score_s,
                    "time/logprobs_s": logprobs_s, "time/update_s": update_s})
    every = max(1, len(texts) // max(cfg.log_samples, 1))
    samples = [{"question": chosen[i // g.group_size].question, "answer": answers[i],
                "completion": texts[i], "reward": float(total[i])}
               for i in range(0, len(texts), every)][:cfg.log_samples]
    return state, metrics, samples


def step_metrics(total, per_function, texts, answers, rollout, updates, kl_penalty, *,
                 elapsed: float) -> dict[str, Any]:
    """One metrics row from a step's rewards, rollout and update metrics (the last
    update's, except the sampler/trainer drift, which only the first sees)."""
    last, lengths = updates[-1], np.asarray(rollout.lengths)
    metrics = {
        "reward/mean": float(total.mean()),
        **{f"reward/{name}": float(v.mean()) for name, v in per_function.items()},
        "format_rate": float(np.mean(np.asarray(rewards.match_format_exactly(texts, answers)) > 0)),
        "accuracy": float(np.mean(np.asarray(rewards.check_numbers(texts, answers)) > 0)),
        "kl": float(last.get("kl_mean", 0.0)),
        "loss": float(last["loss"]),
        "clip_frac": float(last["clip_frac"]),
        "grad_norm": float(last["grad_norm"]),
        "completion_len/mean": float(lengths.mean()),
        "stopped_frac": float(np.mean(np.asarray(rollout.stopped))),
        "logprob_drift": float(updates[0]["logprob_drift"]),
        "tokens_per_s": int(lengths.sum()) / elapsed,
        "step_time_s": elapsed,
        "skipped": int(not all(bool(m["finite"]) for m in updates)),
    }
    if kl_penalty is not None:
        metrics["reward/kl_penalty"] = float(np.mean(kl_penalty))
    return metrics


# ---------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) GRPO as configured, then evaluate; -> the last step's metrics."""
    out_dir = Path(cfg.output_dir)
    # Everything the run will need is resolved before its first step, and every check
    # that can refuse comes before anything in the run directory changes.
    runs.check_resume_config(out_dir, cfg)
    cfg.mesh.check_devices(jax.device_count())
    rewards.check_rewards(cfg.rewards)
    problems = data.load_problems(cfg.data, "train")
    held_out = evaluate.eval_problems(cfg) if cfg.eval_problems else []
    fileio.check_writable(out_dir)
    ckpt = Checkpointer(out_dir, fingerprint=cfg.fingerprint, keep=cfg.keep_checkpoints)
    try:
        ckpt.check_compatible()  # before any heavy loading: a foreign directory fails fast
        base = runs.load_run_base(cfg)
        runs.write_config_once(out_dir, cfg)
        state, metrics = _train_loop(cfg, ckpt, base, problems, held_out)
    finally:
        ckpt.close()
    if held_out and not runs.eval_is_current(out_dir, cfg.steps):
        evaluate.evaluate_run(cfg, base.cfg, base.params, base.tokenizer, state.lora, out_dir,
                              problems=held_out, step=cfg.steps)
    return metrics


def _restore(cfg: TrainConfig, ckpt: Checkpointer, state: step_lib.TrainState
             ) -> tuple[step_lib.TrainState, int]:
    """The newest good checkpoint's state and step (the fresh `state` and 0 without
    one; damaged newer ones are set aside); its recorded data position must be the
    one this config computes."""
    restored = ckpt.restore_latest({"lora": state.lora, "opt_state": state.opt_state})
    if restored is None:
        return state, 0
    for damaged in restored.skipped:  # out of the kept ones, and of their steps' next saves
        log.warning("moved damaged checkpoint %d to %s", damaged.step,
                    ckpt.set_aside(damaged.step))
    position = restored.meta.get("data_position")
    expected = restored.step * cfg.grpo.num_prompts
    if position is not None and position != expected:
        raise runs.ResumeMismatch(
            f"checkpoint {restored.step} in {ckpt.directory} was saved at data position "
            f"{position}, but this config puts step {restored.step} at {expected} "
            f"(grpo.num_prompts={cfg.grpo.num_prompts}); use the run's own config.json")
    log.info("resuming from step %d in %s", restored.step, cfg.output_dir)
    return step_lib.TrainState(**restored.state), restored.step


def _train_loop(cfg: TrainConfig, ckpt: Checkpointer, base: load.LoadedModel, problems,
                held_out) -> tuple[step_lib.TrainState, dict]:
    out_dir = Path(cfg.output_dir)
    model_cfg, params, tokenizer = base.cfg, base.params, base.tokenizer
    fns = step_functions(cfg, model_cfg)
    lora_key, sampling_key = run_keys(cfg.seed)
    state, start = _restore(cfg, ckpt, fns.init_state(lora_lib.init_lora(model_cfg, cfg.lora,
                                                                         lora_key)))
    metrics: dict[str, Any] = {}
    skips_in_a_row = 0
    with MetricsLogger(out_dir, tensorboard=cfg.tensorboard, resume_step=start) as logger, \
            Progress(total=cfg.steps, initial=start) as progress:
        for step in range(start + 1, cfg.steps + 1):
            state, metrics, samples = run_step(cfg, fns, model_cfg, params, tokenizer, state,
                                               problems, step, sampling_key)
            if held_out and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                figures, _ = evaluate.evaluate_model(params, state.lora, tokenizer, held_out,
                                                     model_cfg, **evaluate.eval_options(cfg))
                metrics.update({f"eval/{k}": v for k, v in figures.items()
                                if k.endswith("_accuracy")})
            logger.log(step, metrics)
            logger.log_samples(step, samples)
            progress.update(metrics)
            skips_in_a_row = skips_in_a_row + 1 if metrics["skipped"] else 0
            if cfg.max_consecutive_skips and skips_in_a_row >= cfg.max_consecutive_skips:
                raise TrainingError(f"{skips_in_a_row} steps in a row had a non-finite loss or "
                                    f"gradient (last at step {step}); stopping")
            if step % cfg.save_every == 0 or step == cfg.steps:
                ckpt.save(step, {"lora": state.lora, "opt_state": state.opt_state},
                          {"data_position": step * cfg.grpo.num_prompts})
    return state, metrics


# ---------------------------------------------------------------------------
# CLI


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """--preset picks the defaults; every other flag overrides one field of it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    preset = "cpu-270m"
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
        elif arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
    base = train_preset(preset)
    with deferred_validation():
        cfg = tyro.cli(TrainConfig, default=base, args=argv)
    validate(cfg)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda: train(parse_config(argv)), TrainingError)


if __name__ == "__main__":
    sys.exit(main())
