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
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
import tyro

from grpo_jax import (data, dry_run, evaluate, fileio, grpo, rewards, runs, sampler, sharding,
                      step as step_lib, stop_strings)
from grpo_jax.cli import run_cli
from grpo_jax.checkpoint import Checkpointer
from grpo_jax.config import (ModelConfig, TrainConfig, deferred_validation, train_preset,
                             validate)
from grpo_jax.metrics import MetricsLogger, Progress, format_duration
from grpo_jax.model import gemma3, load, lora as lora_lib
from grpo_jax.tokenizer import END_OF_TURN_ID

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
                   plan: sharding.MeshPlan | None = None) -> step_lib.StepFunctions:
    return step_lib.build_step(model_cfg, cfg.grpo, cfg.optimizer, cfg.total_updates,
                               cfg.sampler.temperature, plan=plan)


def sft_step_functions(cfg: TrainConfig, model_cfg: ModelConfig,
                       plan: sharding.MeshPlan | None = None) -> step_lib.StepFunctions:
    """The SFT phase's update: masked NLL, its own optimizer schedule over sft.steps."""
    return step_lib.build_step(model_cfg, cfg.grpo, cfg.sft.optimizer(cfg.optimizer),
                               cfg.sft.steps, 1.0, objective="sft", plan=plan)


def run_plan(cfg: TrainConfig) -> sharding.MeshPlan | None:
    """The run's device mesh; None for one device in one process (the plain programs)."""
    if cfg.mesh.size == 1 and jax.process_count() == 1:
        return None
    return sharding.plan_for(cfg.mesh)


def place_state(plan: sharding.MeshPlan | None, fns: step_lib.StepFunctions, model_cfg,
                state: step_lib.TrainState) -> step_lib.TrainState:
    """Adapters and optimizer state laid out by the rules (restores then read into the
    same layout)."""
    if plan is None:
        return state
    return sharding.put_tree(state, step_lib.state_shardings(plan, model_cfg, fns.optimizer,
                                                             state.lora))


def target_stop_id(cfg: TrainConfig) -> int | None:
    """The stop token an SFT target ends with: <end_of_turn> for chat prompts (when it
    stops the sampler), else the first stop id (EOS by default); None without any."""
    ids = cfg.sampler.stop_ids
    if cfg.data.prompt_style == "chat" and END_OF_TURN_ID in ids:
        return END_OF_TURN_ID
    return ids[0] if ids else None


class RunShapes(NamedTuple):
    """The padded widths every step of a run uses, fixed from its training problems at
    the start, so each phase compiles its programs once: with widths bucketed per
    batch, a 30-step SFT phase met 10 (prompt, target) shapes and compiled its update
    10 times (~40 s each on 2 cores, as long as the step itself)."""

    prompt_len: int      # prompts (with the prefill) left-padded to this, in both phases
    sft_target_len: int  # SFT targets (with their stop token) right-padded to this


def sft_target_ids(cfg: TrainConfig, tokenizer, problem: data.Problem) -> list[int]:
    """The gold target's tokens: the solution in the answer format, then the stop token."""
    stop = target_stop_id(cfg)
    return (tokenizer.encode(data.sft_target(problem, cfg.data.prefill), add_bos=False)
            + ([] if stop is None else [stop]))


def run_shapes(cfg: TrainConfig, tokenizer, problems) -> tuple[RunShapes, list]:
    """The run's fixed widths, and the problems SFT trains on: those whose target fits
    in sft.max_tokens (a cut target would never show the closing tags). Both come
    from the whole training set, so they are the same on a resume."""
    prompts = data.encode_prompts(tokenizer, problems, cfg.data.prompt_style, cfg.data.prefill)
    prompt_len = sampler.bucket_length(max(map(len, prompts)), cfg.sampler.prompt_bucket)
    if not cfg.sft.steps:
        return RunShapes(prompt_len, 0), []
    lengths = [len(sft_target_ids(cfg, tokenizer, p)) for p in problems]
    fits = [p for p, n in zip(problems, lengths) if n <= cfg.sft.max_tokens]
    if not fits:
        raise data.DataError(f"no training problem's SFT target fits in sft.max_tokens="
                             f"{cfg.sft.max_tokens} (the shortest has {min(lengths)} tokens)")
    longest = max(n for n in lengths if n <= cfg.sft.max_tokens)
    shapes = RunShapes(prompt_len, min(sampler.bucket_length(longest, 32), cfg.sft.max_tokens))
    log.info("SFT trains on the %d of %d problems whose target fits in %d tokens; widths: "
             "prompt %d, target %d", len(fits), len(problems), cfg.sft.max_tokens,
             *shapes)
    return shapes, fits


def sft_batch(cfg: TrainConfig, tokenizer, problems, step: int, shapes: RunShapes
              ) -> step_lib.Batch:
    """SFT step `step`'s problems (of those `run_shapes` chose) as a teacher-forced
    batch: prompt (with the prefill), then the gold target and its stop token."""
    chosen = data.batch_at(problems, cfg.data.shuffle_seed, cfg.data_position(step - 1),
                           cfg.sft.batch_size)
    prompt_tokens, prompt_mask = sampler.left_pad(
        data.encode_prompts(tokenizer, chosen, cfg.data.prompt_style, cfg.data.prefill),
        shapes.prompt_len)
    targets = [sft_target_ids(cfg, tokenizer, p) for p in chosen]
    tokens = np.zeros((len(targets), shapes.sft_target_len), np.int32)
    for row, t in enumerate(targets):
        tokens[row, :len(t)] = t
    lengths = np.asarray([len(t) for t in targets])
    return step_lib.teacher_forced_batch(prompt_tokens, prompt_mask, tokens, lengths, 1)


def run_sft_step(cfg: TrainConfig, fns: step_lib.StepFunctions, params, tokenizer,
                 state: step_lib.TrainState, problems, step: int, shapes: RunShapes,
                 plan: sharding.MeshPlan | None = None):
    """One SFT update on gold solutions. -> state, metrics dict."""
    start = time.perf_counter()
    batch = sharding.put_batch(plan, sft_batch(cfg, tokenizer, problems, step, shapes))
    state, m = fns.update(params, state, batch)
    m = sharding.to_host(m)
    elapsed = time.perf_counter() - start
    tokens = int(np.asarray(batch.completion_mask).sum())
    return state, {"sft/loss": float(m["loss"]), "sft/target_tokens": tokens,
                   "grad_norm": float(m["grad_norm"]),
                   "tokens_per_s": tokens / elapsed, "step_time_s": elapsed,
                   "skipped": int(not bool(m["finite"]))}


def step_problems(cfg: TrainConfig, tokenizer, problems, step: int, shapes: RunShapes):
    """The problems of `step` (1-based) and their prompts, left-padded to the run's width."""
    batch = data.batch_at(problems, cfg.data.shuffle_seed, cfg.data_position(step - 1),
                          cfg.grpo.num_prompts)
    tokens, mask = sampler.left_pad(
        data.encode_prompts(tokenizer, batch, cfg.data.prompt_style, cfg.data.prefill),
        shapes.prompt_len)
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
        batch = sharding.to_host(batch)
        penalty = np.asarray(grpo.kl_reward_penalty(batch.sample_logprobs, batch.ref_logprobs,
                                                    batch.completion_mask, g.beta))
        total_rewards = total_rewards - penalty
    advantages = grpo.group_advantages(total_rewards.astype(np.float32), g.group_size,
                                       scale_by_std=g.scale_advantages_by_std)
    return np.asarray(advantages), penalty


def run_step(cfg: TrainConfig, fns: step_lib.StepFunctions, model_cfg: ModelConfig, params,
             tokenizer, state: step_lib.TrainState, problems, step: int,
             sampling_key: jax.Array, shapes: RunShapes, plan: sharding.MeshPlan | None = None):
    """Sample, score, update. -> state, metrics dict, sample rows."""
    g = cfg.grpo
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return clock[-1] - clock[-2]

    chosen, prompt_tokens, prompt_mask = step_problems(cfg, tokenizer, problems, step, shapes)
    rollout = sampler.sample(params, *sharding.put_batch(plan, (prompt_tokens, prompt_mask)),
                             jax.random.fold_in(sampling_key, step), cfg=model_cfg,
                             sampling=cfg.sampler, group=g.group_size, lora=state.lora,
                             stop_table=stop_strings.stop_table(
                                 tokenizer, cfg.sampler.stop_strings, model_cfg.vocab_size),
                             plan=plan)
    rollout = sharding.to_host(rollout)
    sample_s = lap()

    # The rewards read the answer as the model wrote it: the prefill, then its completion.
    texts = [cfg.data.prefill + t for t in
             sampler.decode_completions(tokenizer, rollout, cfg.sampler.stop_strings)]
    answers = [p.answer for p in chosen for _ in range(g.group_size)]
    total, per_function = rewards.score_completions(texts, answers, cfg.rewards)
    batch = sharding.put_batch(plan, step_lib.teacher_forced_batch(
        prompt_tokens, prompt_mask, rollout.tokens, rollout.lengths, g.group_size,
        rollout.sampling_logprobs))
    score_s = lap()

    if g.beta > 0:
        batch = batch.replace(ref_logprobs=fns.batch_logprobs(params, None, batch))
    advantages, kl_penalty = completion_advantages(cfg, total, batch)
    batch = batch.replace(advantages=sharding.put_batch(plan, advantages))
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
    updates = sharding.to_host(updates)
    update_s = lap()

    metrics = step_metrics(total, per_function, texts, answers, rollout, updates,
                           kl_penalty, elapsed=clock[-1] - clock[0], group=g.group_size)
    metrics.update({"time/sample_s": sample_s, "time/score_s": score_s,
                    "time/logprobs_s": logprobs_s, "time/update_s": update_s})
    every = max(1, len(texts) // max(cfg.log_samples, 1))
    samples = [{"question": chosen[i // g.group_size].question, "answer": answers[i],
                "completion": texts[i], "reward": float(total[i])}
               for i in range(0, len(texts), every)][:cfg.log_samples]
    return state, metrics, samples


def step_metrics(total, per_function, texts, answers, rollout, updates, kl_penalty, *,
                 elapsed: float, group: int) -> dict[str, Any]:
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
        # Groups whose G rewards are all equal: zero advantage, no learning signal.
        "zero_variance_groups": float(np.mean(np.ptp(total.reshape(-1, group), axis=1) == 0)),
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
    if cfg.dry_run:
        report = dry_run.dry_run(cfg, cfg.topology)
        if cfg.dry_run_json:
            dry_run.write_report(report, cfg.dry_run_json)
        return {}
    out_dir = Path(cfg.output_dir)
    # Everything the run will need is resolved before its first step, and every check
    # that can refuse comes before anything in the run directory changes.
    runs.check_resume_config(out_dir, cfg)
    sharding.initialize_distributed(cfg.distributed)
    sharding.check_run(cfg, dry_run.run_model_config(cfg), jax.device_count())
    if cfg.eval_problems and jax.process_count() > 1:
        raise ValueError("the end-of-run evaluation runs in one process: pass "
                         "--eval-problems 0 to a multi-host run and evaluate its checkpoint "
                         "with python -m grpo_jax.evaluate")
    rewards.check_rewards(cfg.rewards)
    problems = data.load_problems(cfg.data, "train", need_solution=cfg.sft.steps > 0)
    held_out = evaluate.eval_problems(cfg) if cfg.eval_problems else []
    fileio.check_writable(out_dir)
    ckpt = Checkpointer(out_dir, fingerprint=cfg.fingerprint, keep=cfg.keep_checkpoints)
    try:
        ckpt.check_compatible()  # before any heavy loading: a foreign directory fails fast
        base = runs.load_run_base(cfg)
        if jax.process_index() == 0:
            runs.write_config_once(out_dir, cfg)
        evals = evaluate.EvalFile(cfg, out_dir, held_out) if held_out else None
        metrics = _train_loop(cfg, ckpt, base, problems, evals)
    finally:
        ckpt.close()
    if evals is not None and jax.process_index() == 0:
        print(evals.table())
    return metrics


def _restore(cfg: TrainConfig, ckpt: Checkpointer, sft_state: step_lib.TrainState | None,
             grpo_state: step_lib.TrainState) -> tuple[int, dict]:
    """The newest good checkpoint's step and items (0 and {} without one; damaged
    newer ones are set aside); its recorded data position must be the one this
    config computes."""
    def template(step: int) -> dict:
        state = sft_state if cfg.sft.steps and cfg.is_sft_step(step) else grpo_state
        items = {"lora": state.lora, "opt_state": state.opt_state}
        return {"sft_lora": sft_state.lora, **items} if "sft_lora" in runs.checkpoint_items(
            cfg, step) else items

    restored = ckpt.restore_latest(template)
    if restored is None:
        return 0, {}
    for damaged in restored.skipped:  # out of the kept ones, and of their steps' next saves
        log.warning("moved damaged checkpoint %d to %s", damaged.step,
                    ckpt.set_aside(damaged.step))
    position = restored.meta.get("data_position")
    expected = cfg.data_position(restored.step)
    if position is not None and position != expected:
        raise runs.ResumeMismatch(
            f"checkpoint {restored.step} in {ckpt.directory} was saved at data position "
            f"{position}, but this config puts step {restored.step} at {expected} "
            f"(sft.batch_size={cfg.sft.batch_size}, grpo.num_prompts={cfg.grpo.num_prompts}); "
            "use the run's own config.json")
    log.info("resuming from step %d in %s", restored.step, cfg.output_dir)
    return restored.step, restored.state


def _train_loop(cfg: TrainConfig, ckpt: Checkpointer, base: load.LoadedModel, problems,
                evals: evaluate.EvalFile | None) -> dict:
    """SFT steps 1..sft.steps, then GRPO steps to total_steps, from the newest checkpoint.

    At the boundary the SFT adapters are merged into the base weights: the merged
    weights are GRPO's starting point and its KL reference (LoRA off), and GRPO trains
    a fresh LoRA on them. GRPO-phase checkpoints keep the SFT adapters ('sft_lora'),
    so a resume rebuilds the same merged weights.
    """
    out_dir, sft_steps = Path(cfg.output_dir), cfg.sft.steps
    model_cfg, params, tokenizer = base
    del base  # after the merge the base weights are not held twice
    plan = run_plan(cfg)
    if plan is not None:
        params = sharding.put_tree(params, gemma3.param_shardings(plan, model_cfg))
    lora_key, sampling_key = run_keys(cfg.seed)
    fns = step_functions(cfg, model_cfg, plan)
    grpo_state = place_state(plan, fns, model_cfg, fns.init_state(
        lora_lib.init_lora(model_cfg, cfg.lora, lora_key)))
    sft_fns = sft_step_functions(cfg, model_cfg, plan) if sft_steps else None
    sft_state = place_state(plan, sft_fns, model_cfg, sft_fns.init_state(lora_lib.init_lora(
        model_cfg, cfg.lora, jax.random.fold_in(lora_key, 1)))) if sft_steps else None
    # Checkpoints restore into the layout of these templates (sharded on a mesh).
    start, restored = _restore(cfg, ckpt, sft_state, grpo_state)
    shapes, sft_problems = run_shapes(cfg, tokenizer, problems)

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

        def finish_step(step: int, metrics: dict, samples=(), items=None) -> None:
            nonlocal skips_in_a_row
            logger.log(step, metrics)
            logger.log_samples(step, samples)
            progress.update(metrics, phase="sft" if cfg.is_sft_step(step) else "grpo")
            skips_in_a_row = skips_in_a_row + 1 if metrics["skipped"] else 0
            if cfg.max_consecutive_skips and skips_in_a_row >= cfg.max_consecutive_skips:
                raise TrainingError(f"{skips_in_a_row} steps in a row had a non-finite loss or "
                                    f"gradient (last at step {step}); stopping")
            # The SFT -> GRPO boundary is always saved: GRPO starts from it.
            if step % cfg.save_every == 0 or step in (sft_steps, cfg.total_steps):
                ckpt.save(step, items, {"data_position": cfg.data_position(step),
                                        "phase": "sft" if cfg.is_sft_step(step) else "grpo"})

        evaluate_column("base", 0, None)
        sft_lora = None
        if sft_steps:
            if start < sft_steps:
                progress.note(f"SFT: steps {start + 1}-{sft_steps} of {cfg.total_steps}")
                if start:
                    sft_state = step_lib.TrainState(restored["lora"], restored["opt_state"])
                for step in range(start + 1, sft_steps + 1):
                    sft_state, metrics = run_sft_step(cfg, sft_fns, params, tokenizer, sft_state,
                                                      sft_problems, step, shapes, plan)
                    finish_step(step, metrics, items={"lora": sft_state.lora,
                                                      "opt_state": sft_state.opt_state})
                sft_lora = sft_state.lora
            else:
                sft_lora = restored["lora" if start == sft_steps else "sft_lora"]
            evaluate_column("sft", sft_steps, sft_lora)
            params = lora_lib.merge(params, sft_lora)
            if plan is not None:
                params = sharding.put_tree(params, gemma3.param_shardings(plan, model_cfg))
        if start > sft_steps:
            grpo_state = step_lib.TrainState(restored["lora"], restored["opt_state"])
        state = grpo_state
        if max(start, sft_steps) < cfg.total_steps:
            progress.note(f"GRPO: steps {max(start, sft_steps) + 1}-{cfg.total_steps} of "
                          f"{cfg.total_steps}")
        for step in range(max(start, sft_steps) + 1, cfg.total_steps + 1):
            state, metrics, samples = run_step(cfg, fns, model_cfg, params, tokenizer, state,
                                               problems, step, sampling_key, shapes, plan)
            if evals is not None and cfg.eval_every and step % cfg.eval_every == 0 \
                    and step < cfg.total_steps:
                figures, _ = evaluate.evaluate_model(params, state.lora, tokenizer,
                                                     evals.problems, model_cfg,
                                                     **evaluate.eval_options(cfg))
                metrics.update({f"eval/{k}": v for k, v in figures.items()
                                if k.endswith("_accuracy")})
            items = {"lora": state.lora, "opt_state": state.opt_state}
            finish_step(step, metrics, samples,
                        {"sft_lora": sft_lora, **items} if sft_lora is not None else items)
    evaluate_column("trained", cfg.total_steps, state.lora)
    return metrics


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
