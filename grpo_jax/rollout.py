"""One GRPO step, top to bottom, each arrow one call:

    data.batch_at / left_pad     -> B prompts at the stream position (host)
    sampler.sample               -> B x G completions from base + LoRA (device; prefill
                                    once per prompt), brought to the host
    decode, rewards              -> texts, total and per-function rewards (host, NumPy)
    (dynamic sampling)           -> groups with all-equal rewards left out; more rounds
                                    of B prompts until B groups carry a signal or the
                                    round bound is hit (grpo.filter_zero_variance)
    advantages                   -> group advantages of the kept groups (host, NumPy)
    sharding.put_batch           -> the teacher-forced batch, uploaded once
    fns.batch_logprobs(LoRA off) -> reference log-probs (device, when beta > 0)
    fns.update x mu              -> clipped surrogate + beta KL, grads w.r.t. LoRA only
    step_metrics                 -> one metrics row (host, from the rewards already run)

With the k1 estimator the KL is a penalty on the reward, so the advantages wait for
the reference pass: its [N] penalties come to the host and the [N] advantages go up.
"""
from __future__ import annotations

import time
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from grpo_jax import data, eval_metrics, grpo, rewards, sampler, sharding, update
from grpo_jax.config import TrainConfig
from grpo_jax.context import RunShapes, StepContext


def step_problems(cfg: TrainConfig, tokenizer, problems, position: int, shapes: RunShapes):
    """num_prompts problems from stream `position` and their prompts, left-padded to the
    run's width."""
    batch = data.batch_at(problems, cfg.data.shuffle_seed, position, cfg.grpo.num_prompts)
    tokens, mask = sampler.left_pad(data.run_prompts(tokenizer, batch, cfg.data),
                                    shapes.prompt_len)
    return batch, tokens, mask


class Round(NamedTuple):
    """One sampler pass over num_prompts prompts, scored, on the host."""
    problems: list           # [B] data.Problem
    prompt_tokens: np.ndarray  # [B, P]
    prompt_mask: np.ndarray    # [B, P]
    rollout: Any               # decode.SampleOutput of [B*G] rows, NumPy
    texts: list[str]           # [B*G] the prefill + completion, as the rewards read it
    total: np.ndarray          # [B*G] weighted reward
    per_function: dict         # reward name -> [B*G] unweighted scores


def sample_round(ctx: StepContext, params, lora, key, position: int) -> Round:
    """Sample G completions for each of the B prompts at `position` and score them."""
    cfg, g = ctx.cfg, ctx.cfg.grpo
    chosen, prompt_tokens, prompt_mask = step_problems(cfg, ctx.tokenizer, ctx.problems,
                                                       position, ctx.shapes)
    out = sharding.to_host(sampler.sample(
        params, prompt_tokens, prompt_mask, key, cfg=ctx.model_cfg, sampling=cfg.sampler,
        group=g.group_size, lora=lora, stop_table=ctx.stop_table, plan=ctx.plan,
        toolbox=ctx.toolbox))
    # The rewards read the answer as the model wrote it: the prefill, then its completion.
    texts = [cfg.data.prefill + t for t in
             sampler.decode_completions(ctx.tokenizer, out, cfg.sampler.stop_strings)]
    answers = [p.answer for p in chosen for _ in range(g.group_size)]
    questions = [p.question for p in chosen for _ in range(g.group_size)]
    total, per_function = rewards.score_completions(texts, answers, cfg.rewards, questions)
    return Round(chosen, np.asarray(prompt_tokens), np.asarray(prompt_mask), out, texts,
                 np.asarray(total), per_function)


def informative_groups(total: np.ndarray, group: int) -> np.ndarray:
    """[B] bool: the groups whose G rewards are not all equal (a non-zero advantage)."""
    return np.ptp(np.asarray(total).reshape(-1, group), axis=1) > 0


def pick_groups(rounds: Sequence[Round], group: int, wanted: int,
                filtering: bool) -> tuple[list[tuple[int, int]], int]:
    """(round, group) pairs for the batch, in draw order, and how many of them carry a
    signal. Without filtering: the first round's groups as drawn. With it: the first
    `wanted` informative groups, topped up with left-out groups when too few were drawn."""
    if not filtering:
        picks = [(0, i) for i in range(wanted)]
        return picks, int(informative_groups(rounds[0].total, group).sum())
    signal, flat = [], []
    for r, drawn in enumerate(rounds):
        for i, has in enumerate(informative_groups(drawn.total, group)):
            (signal if has else flat).append((r, i))
    picks = signal[:wanted]
    return picks + flat[:wanted - len(picks)], len(picks)


def gather_groups(rounds: Sequence[Round], picks, group: int) -> Round:
    """The picked groups of several rounds as one Round of len(picks) prompts."""
    rows = [(r, i * group + j) for r, i in picks for j in range(group)]

    def take(get, index):
        return np.stack([np.asarray(get(rounds[r]))[k] for r, k in index])

    out = type(rounds[0].rollout)(*(
        None if getattr(rounds[0].rollout, f) is None
        else take(lambda d, f=f: getattr(d.rollout, f), rows) if f != "steps"
        else np.max([np.asarray(d.rollout.steps) for d in rounds])
        for f in rounds[0].rollout._fields))
    return Round([rounds[r].problems[i] for r, i in picks],
                 take(lambda d: d.prompt_tokens, picks),
                 take(lambda d: d.prompt_mask, picks), out,
                 [rounds[r].texts[k] for r, k in rows], take(lambda d: d.total, rows),
                 {name: take(lambda d, n=name: d.per_function[n], rows)
                  for name in rounds[0].per_function})


def draw_batch(ctx: StepContext, params, lora, step: int,
               position: int) -> tuple[Round, list[Round], dict[str, float]]:
    """The step's batch of num_prompts groups, every round drawn for it, and the
    dynamic-sampling metrics. Round 0 samples with fold_in(sampling_key, step), round
    r > 0 with fold_in of that key and r: a step's draws depend on its number only."""
    g = ctx.cfg.grpo
    key = jax.random.fold_in(ctx.sampling_key, step)
    rounds: list[Round] = []
    found = 0  # informative groups drawn so far
    for r in range(ctx.cfg.rounds_per_step):
        rounds.append(sample_round(ctx, params, lora, key if r == 0 else
                                   jax.random.fold_in(key, r), position + r * g.num_prompts))
        found += int(informative_groups(rounds[-1].total, g.group_size).sum())
        if found >= g.num_prompts:
            break
    picks, signal = pick_groups(rounds, g.group_size, g.num_prompts, g.filter_zero_variance)
    drawn = len(rounds) * g.batch_size
    metrics = {"dynamic/rounds": len(rounds), "dynamic/samples_drawn": drawn,
               "dynamic/informative_drawn": found, "dynamic/informative_groups": signal,
               # Groups drawn but not trained on (all-equal rewards, or past the batch),
               # and left-out groups that topped up a batch the round bound left short.
               "dynamic/dropped_groups": len(rounds) * g.num_prompts - len(picks),
               "dynamic/filled_groups": g.num_prompts - signal if g.filter_zero_variance else 0,
               "dynamic/samples_per_informative_group": drawn / max(signal, 1)}
    return gather_groups(rounds, picks, g.group_size), rounds, metrics


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


def grpo_step(ctx: StepContext, params, state: update.TrainState, step: int,
              position: int):
    """Sample, score, update, with the problem stream at `position`.
    -> state, metrics dict, sample rows, the stream position after the step."""
    cfg, g, plan, fns = ctx.cfg, ctx.cfg.grpo, ctx.plan, ctx.fns
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return clock[-1] - clock[-2]

    batch_round, rounds, dynamic = draw_batch(ctx, params, state.lora, step, position)
    sample_s = lap()

    total = batch_round.total
    in_reward = penalty_in_reward(cfg)
    rollout = batch_round.rollout
    batch = sharding.put_batch(plan, update.teacher_forced_batch(
        batch_round.prompt_tokens, batch_round.prompt_mask, rollout.tokens, rollout.lengths,
        g.group_size, rollout.sampling_logprobs,
        None if in_reward else completion_advantages(cfg, total), rollout.policy_mask))
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

    # The reward figures describe everything the policy drew this step, not only the
    # groups kept for the update (those are chosen for their spread).
    every_round = gather_groups(rounds, [(r, i) for r in range(len(rounds))
                                         for i in range(g.num_prompts)], g.group_size)
    answers = [p.answer for p in every_round.problems for _ in range(g.group_size)]
    metrics = step_metrics(every_round.total, every_round.per_function, every_round.texts,
                           answers, every_round.rollout, updates, kl_penalty,
                           elapsed=clock[-1] - clock[0], group=g.group_size)
    position += len(rounds) * g.num_prompts
    metrics.update({"time/sample_s": sample_s, "time/score_s": score_s,
                    "time/logprobs_s": logprobs_s, "time/update_s": update_s, **dynamic,
                    "data_position": position})
    texts = every_round.texts
    every = max(1, len(texts) // max(cfg.log_samples, 1))
    samples = [{"question": every_round.problems[i // g.group_size].question,
                "answer": answers[i], "completion": texts[i],
                "reward": float(every_round.total[i])}
               for i in range(0, len(texts), every)][:cfg.log_samples]
    return state, metrics, samples, position


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
        "zero_variance_groups": float(np.mean(~informative_groups(total, group))),
        "stopped_frac": float(np.mean(np.asarray(rollout.stopped))),
        "logprob_drift": float(updates[0]["logprob_drift"]),
        "tokens_per_s": int(lengths.sum()) / elapsed,
        "step_time_s": elapsed,
        "skipped": int(not all(bool(m["finite"]) for m in updates)),
    }
    if kl_penalty is not None:
        metrics["reward/kl_penalty"] = float(np.mean(kl_penalty))
    if getattr(rollout, "tool_calls", None) is not None:
        policy = np.asarray(rollout.policy_mask)
        real = np.arange(policy.shape[1])[None, :] < lengths[:, None]
        metrics["tool/calls_mean"] = float(np.mean(rollout.tool_calls))
        # Of the completions' tokens, the share a tool wrote (context, not trained on).
        metrics["tool/token_frac"] = float(np.sum(real & ~policy) / max(int(real.sum()), 1))
    return metrics
