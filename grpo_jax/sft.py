"""The SFT warm-up: gold worked solutions as targets, the run's fixed widths, and one
supervised step (a batch built on the host, uploaded once, one update)."""
from __future__ import annotations

import logging
import time

import numpy as np

from grpo_jax import data, sampler, sharding, update
from grpo_jax.config import TrainConfig
from grpo_jax.context import RunShapes, StepContext
from grpo_jax.tokenizer import END_OF_TURN_ID

log = logging.getLogger("grpo_jax.train")


def target_stop_id(cfg: TrainConfig) -> int | None:
    """The stop token an SFT target ends with: <end_of_turn> for chat prompts (when it
    stops the sampler), else the first stop id (EOS by default); None without any."""
    ids = cfg.sampler.stop_ids
    if cfg.data.prompt_style == "chat" and END_OF_TURN_ID in ids:
        return END_OF_TURN_ID
    return ids[0] if ids else None


def target_ids(cfg: TrainConfig, tokenizer, problem: data.Problem) -> list[int]:
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
    lengths = [len(target_ids(cfg, tokenizer, p)) for p in problems]
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
              ) -> update.Batch:
    """SFT step `step`'s problems (of those `run_shapes` chose) as a teacher-forced host
    batch: prompt (with the prefill), then the gold target and its stop token."""
    chosen = data.batch_at(problems, cfg.data.shuffle_seed, cfg.data_position(step - 1),
                           cfg.sft.batch_size)
    prompt_tokens, prompt_mask = sampler.left_pad(
        data.encode_prompts(tokenizer, chosen, cfg.data.prompt_style, cfg.data.prefill),
        shapes.prompt_len)
    targets = [target_ids(cfg, tokenizer, p) for p in chosen]
    tokens = np.zeros((len(targets), shapes.sft_target_len), np.int32)
    for row, t in enumerate(targets):
        tokens[row, :len(t)] = t
    lengths = np.asarray([len(t) for t in targets])
    return update.teacher_forced_batch(prompt_tokens, prompt_mask, tokens, lengths, 1)


def sft_step(ctx: StepContext, params, state: update.TrainState, step: int):
    """One SFT update on gold solutions. -> state, metrics dict."""
    start = time.perf_counter()
    host = sft_batch(ctx.cfg, ctx.tokenizer, ctx.problems, step, ctx.shapes)
    state, m = ctx.fns.update(params, state, sharding.put_batch(ctx.plan, host))
    m = sharding.to_host(m)
    elapsed = time.perf_counter() - start
    tokens = int(host.completion_mask.sum())
    return state, {"sft/loss": float(m["loss"]), "sft/target_tokens": tokens,
                   "grad_norm": float(m["grad_norm"]),
                   "tokens_per_s": tokens / elapsed, "step_time_s": elapsed,
                   "skipped": int(not bool(m["finite"]))}
