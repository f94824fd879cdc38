"""One GRPO step, top to bottom, each arrow one call:

    data.batch_at / left_pad     -> B prompts at the stream position (step - 1) * B (host)
    sampler.sample               -> B x G completions from base + LoRA (device; prefill
                                    once per prompt), brought to the host
    decode, rewards, advantages  -> texts, total and per-function rewards, group
                                    advantages (host, NumPy)
    sharding.put_batch           -> the teacher-forced batch, uploaded once
    fns.batch_logprobs(LoRA off) -> reference log-probs (device, when beta > 0)
    fns.update x mu              -> clipped surrogate + beta KL, grads w.r.t. LoRA only
    step_metrics                 -> one metrics row (host, from the rewards already run)

With the k1 estimator the KL is a penalty on the reward, so the advantages wait for
the reference pass: its [N] penalties come to the host and the [N] advantages go up.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from grpo_jax import data, eval_metrics, grpo, rewards, sampler, sharding, update
from grpo_jax.config import TrainConfig
from grpo_jax.context import RunShapes, StepContext


def step_problems(cfg: TrainConfig, tokenizer, problems, step: int, shapes: RunShapes):
    """The problems of `step` (1-based) and their prompts, left-padded to the run's width."""
    batch = data.batch_at(problems, cfg.data.shuffle_seed, cfg.data_position(step - 1),
                          cfg.grpo.num_prompts)
    tokens, mask = sampler.left_pad(
        data.encode_prompts(tokenizer, batch, cfg.data.prompt_style, cfg.data.prefill),
        shapes.prompt_len)
    return batch, tokens, mask


def penalty_in_reward(cfg: TrainConfig) -> bool:
    """k1: the KL is beta * the completion's summed log-ratio, taken off its reward."""
    return cfg.grpo.kl_estimator == "k1" and cfg.grpo.beta > 0


def completion_advantages(cfg: TrainConfig, total_rewards: np.ndarray,
                          kl_penalty: np.ndarray | None = None) -> np.ndarray:
    """Group advantages of the rewards (less the k1 penalty, when given), NumPy."""
    g = cfg.grpo
    if kl_penalty is not None:
        total_rewards = total_rewards - kl_penalty
    return grpo.group_advantages(np.asarray(total_rewards, np.float32), g.group_size,
                                 scale_by_std=g.scale_advantages_by_std)


def kl_penalties(cfg: TrainConfig, batch: update.Batch) -> np.ndarray:
    """The k1 penalty per completion [N], from the batch's sampler and reference
    log-probs on the device: only these N numbers come back."""
    return np.asarray(sharding.to_host(grpo.kl_reward_penalty(
        batch.sample_logprobs, batch.ref_logprobs, batch.completion_mask, cfg.grpo.beta)))


def grpo_step(ctx: StepContext, params, state: update.TrainState, step: int):
    """Sample, score, update. -> state, metrics dict, sample rows."""
    cfg, g, plan, fns = ctx.cfg, ctx.cfg.grpo, ctx.plan, ctx.fns
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return clock[-1] - clock[-2]

    chosen, prompt_tokens, prompt_mask = step_problems(cfg, ctx.tokenizer, ctx.problems, step,
                                                       ctx.shapes)
    rollout = sampler.sample(params, prompt_tokens, prompt_mask,
                             jax.random.fold_in(ctx.sampling_key, step), cfg=ctx.model_cfg,
                             sampling=cfg.sampler, group=g.group_size, lora=state.lora,
                             stop_table=ctx.stop_table, plan=plan)
    rollout = sharding.to_host(rollout)
    sample_s = lap()

    # The rewards read the answer as the model wrote it: the prefill, then its completion.
    texts = [cfg.data.prefill + t for t in
             sampler.decode_completions(ctx.tokenizer, rollout, cfg.sampler.stop_strings)]
    answers = [p.answer for p in chosen for _ in range(g.group_size)]
    questions = [p.question for p in chosen for _ in range(g.group_size)]
    total, per_function = rewards.score_completions(texts, answers, cfg.rewards, questions)
    in_reward = penalty_in_reward(cfg)
    batch = sharding.put_batch(plan, update.teacher_forced_batch(
        prompt_tokens, prompt_mask, rollout.tokens, rollout.lengths, g.group_size,
        rollout.sampling_logprobs, None if in_reward else completion_advantages(cfg, total)))
    score_s = lap()

    if g.beta > 0:
        batch = batch.replace(ref_logprobs=fns.batch_logprobs(params, None, batch))
    kl_penalty = None
    if in_reward:
        kl_penalty = kl_penalties(cfg, batch)
        batch = batch.replace(advantages=sharding.put_batch(
            plan, completion_advantages(cfg, total, kl_penalty)))
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


def _scores(name: str, fn, per_function, texts, answers) -> np.ndarray:
    """A reward's unweighted scores: the step's own when the run has that reward."""
    if name in per_function:
        return per_function[name]
    return np.asarray(fn(texts, answers))


def step_metrics(total, per_function, texts, answers, rollout, updates, kl_penalty, *,
                 elapsed: float, group: int) -> dict[str, Any]:
    """One metrics row from a step's rewards, rollout and update metrics (the last
    update's, except the sampler/trainer drift, which only the first sees)."""
    last, lengths = updates[-1], np.asarray(rollout.lengths)
    formatted = _scores("match_format_exactly", rewards.match_format_exactly, per_function,
                        texts, answers)
    correct = _scores("check_numbers", rewards.check_numbers, per_function, texts, answers)
    steps = eval_metrics.step_counts(texts)
    stated = sum(c.stated for c in steps)
    metrics = {
        "reward/mean": float(total.mean()),
        **{f"reward/{name}": float(v.mean()) for name, v in per_function.items()},
        "format_rate": float(np.mean(formatted > 0)),
        "accuracy": float(np.mean(correct > 0)),
        # Of the arithmetic steps the samples state, the fraction that are right.
        "step_accuracy": sum(c.right for c in steps) / stated if stated else 0.0,
        "steps_stated/mean": stated / len(steps),
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
