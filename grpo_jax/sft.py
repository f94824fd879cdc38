"""The SFT warm-up: gold worked solutions as targets, the run's fixed widths, and one
supervised step (a batch built on the host, uploaded once, one update). With
sft.pack_length the step's problems are packed end to end into rows (`pack_rows`)."""
from __future__ import annotations

import logging
import math
import time

import numpy as np

from grpo_jax import data, sampler, sharding, tools, update
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
    return target_tokens(cfg, tokenizer, problem)[0]


def target_tokens(cfg: TrainConfig, tokenizer, problem: data.Problem
                  ) -> tuple[list[int], list[bool]]:
    """The gold target's tokens and which of them the policy writes (SFT's loss mask).
    With a tool (sampler.tools), the solution's arithmetic steps are written as calls
    (`tools.with_calls`) and the results the tool would write are context, not targets
    (targets too with sft.tool_results)."""
    stop = target_stop_id(cfg)
    tail = [] if stop is None else [stop]
    s = cfg.sampler
    if not s.tools:
        ids = tokenizer.encode(data.sft_target(problem, cfg.data.prefill), add_bos=False) + tail
        return ids, [True] * len(ids)
    markers = tools.CallMarkers(*s.tool_call)
    solution = tools.with_calls(problem.solution or "", markers, s.max_tool_calls,
                                tools.get_tool(s.tools[0]))
    ids, policy = tools.encode_with_calls(
        tokenizer, data.sft_target(problem._replace(solution=solution or None),
                                   cfg.data.prefill), markers)
    if cfg.sft.tool_results:
        policy = [True] * len(ids)
    return ids + tail, policy + [True] * len(tail)


def run_shapes(cfg: TrainConfig, tokenizer, problems) -> tuple[RunShapes, list]:
    """The run's fixed widths, and the problems SFT trains on: those whose target fits
    in sft.max_tokens (a cut target would never show the closing tags) and, packed,
    whose prompt and target fit in a row. Both come from the whole training set (and,
    packed, from every SFT step's problems), so they are the same on a resume."""
    prompts = data.run_prompts(tokenizer, problems, cfg.data)
    prompt_len = sampler.bucket_length(max(map(len, prompts)), cfg.sampler.prompt_bucket)
    if not cfg.sft.steps:
        return RunShapes(prompt_len, 0), []
    lengths = [len(target_ids(cfg, tokenizer, p)) for p in problems]
    pack = cfg.sft.pack_length
    keep = [n <= cfg.sft.max_tokens and (not pack or len(q) + n <= pack)
            for q, n in zip(prompts, lengths)]
    fits = [p for p, k in zip(problems, keep) if k]
    if not fits:
        raise data.DataError(
            f"no training problem's SFT target fits in sft.max_tokens={cfg.sft.max_tokens}"
            + (f" with its prompt in sft.pack_length={pack}" if pack else "")
            + f" (the shortest target has {min(lengths)} tokens)")
    longest = max(n for n, k in zip(lengths, keep) if k)
    shapes = RunShapes(prompt_len, min(sampler.bucket_length(longest, 32), cfg.sft.max_tokens))
    if pack:
        sizes = [(len(q), n) for q, n, k in zip(prompts, lengths, keep) if k]
        shapes = shapes._replace(**pack_shape(cfg, sizes))
    log.info("SFT trains on the %d of %d problems whose target fits in %d tokens; widths: "
             "%s", len(fits), len(problems), cfg.sft.max_tokens, shapes)
    return shapes, fits


def first_fit(sizes: list[int], capacity: int) -> list[list[int]]:
    """Item indices grouped into bins of `capacity`, first-fit decreasing (largest item
    first, into the first bin with room; ties in index order: deterministic)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        for b, free in enumerate(room):
            if sizes[i] <= free:
                bins[b].append(i)
                room[b] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(capacity - sizes[i])
    return bins


def pack_shape(cfg: TrainConfig, sizes: list[tuple[int, int]]) -> dict:
    """sft_rows and sft_targets for packed SFT: over every SFT step of the run, the most
    rows its problems take and the most targets a row holds (sizes: (prompt, target)
    tokens of each SFT problem, in the order `sft_batch` draws from). Rows are a
    multiple of the mesh's row devices and of the micro-batch."""
    rows, targets = 1, 1
    for step in range(1, cfg.sft.steps + 1):
        chosen = [sizes[i] for i in data.order_at(len(sizes), cfg.data.shuffle_seed,
                                                  cfg.data_position(step - 1),
                                                  cfg.sft.batch_size)]
        bins = first_fit([q + n for q, n in chosen], cfg.sft.pack_length)
        rows = max(rows, len(bins))
        targets = max(targets, max(sum(chosen[i][1] for i in b) for b in bins))
    unit = math.lcm(cfg.mesh.data * cfg.mesh.fsdp, cfg.grpo.micro_batch or 1)
    return {"sft_rows": -(-rows // unit) * unit, "sft_targets": sampler.bucket_length(targets, 8)}


def pack_rows(examples: list[tuple[list[int], list[int]]], rows: int, length: int,
              width: int, policy: list[list[bool]] | None = None) -> update.PackedBatch:
    """(prompt ids, target ids) pairs -> `rows` host rows of `length` tokens, each pair a
    sequence of its own (segment 2, 3, ... in its row; positions from 0), and per row
    the `width` slots of (predicting position, target id, mask) for its targets.
    policy: per example, which target tokens are trained on (default all; a tool's
    result is context only)."""
    tokens = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    segments = np.zeros((rows, length), np.int32)
    index = np.zeros((rows, width), np.int32)
    targets = np.zeros((rows, width), np.int32)
    mask = np.zeros((rows, width), bool)
    bins = first_fit([len(p) + len(t) for p, t in examples], length)
    if len(bins) > rows:
        raise ValueError(f"{len(examples)} examples need {len(bins)} rows of {length} tokens, "
                         f"{rows} allowed")
    for r, members in enumerate(bins):
        at = slot = 0
        for seg, i in enumerate(members):
            prompt, target = examples[i]
            seq = list(prompt) + list(target)
            if slot + len(target) > width:
                raise ValueError(f"row {r} holds more than {width} target tokens")
            tokens[r, at:at + len(seq)] = seq
            positions[r, at:at + len(seq)] = np.arange(len(seq))
            segments[r, at:at + len(seq)] = 2 + seg
            # Target token j sits at at + len(prompt) + j and is predicted one earlier.
            index[r, slot:slot + len(target)] = at + len(prompt) - 1 + np.arange(len(target))
            targets[r, slot:slot + len(target)] = target
            mask[r, slot:slot + len(target)] = True if policy is None else policy[i]
            at, slot = at + len(seq), slot + len(target)
    return update.PackedBatch(tokens, positions, segments, index, targets, mask)


def sft_batch(cfg: TrainConfig, tokenizer, problems, step: int, shapes: RunShapes):
    """SFT step `step`'s problems (of those `run_shapes` chose) as a teacher-forced host
    batch: prompt (with the prefill), then the gold target and its stop token; one
    problem a row (`update.Batch`), or packed (`update.PackedBatch`)."""
    chosen = data.batch_at(problems, cfg.data.shuffle_seed, cfg.data_position(step - 1),
                           cfg.sft.batch_size)
    prompts = data.run_prompts(tokenizer, chosen, cfg.data)
    targets, policy = zip(*[target_tokens(cfg, tokenizer, p) for p in chosen])
    tooled = bool(cfg.sampler.tools)
    if cfg.sft.pack_length:
        return pack_rows(list(zip(prompts, targets)), shapes.sft_rows, cfg.sft.pack_length,
                         shapes.sft_targets, list(policy) if tooled else None)
    prompt_tokens, prompt_mask = sampler.left_pad(prompts, shapes.prompt_len)
    tokens = np.zeros((len(targets), shapes.sft_target_len), np.int32)
    trained = np.zeros(tokens.shape, bool)
    for row, (t, p) in enumerate(zip(targets, policy)):
        tokens[row, :len(t)], trained[row, :len(p)] = t, p
    lengths = np.asarray([len(t) for t in targets])
    return update.teacher_forced_batch(prompt_tokens, prompt_mask, tokens, lengths, 1,
                                       policy_mask=trained if tooled else None)


def sft_step(ctx: StepContext, params, state: update.TrainState, step: int):
    """One SFT update on gold solutions. -> state, metrics dict."""
    start = time.perf_counter()
    host = sft_batch(ctx.cfg, ctx.tokenizer, ctx.problems, step, ctx.shapes)
    state, m = ctx.fns.update(params, state, sharding.put_batch(ctx.plan, host))
    m = sharding.to_host(m)
    elapsed = time.perf_counter() - start
    tokens = int(host.completion_mask.sum())
    slots = host.tokens.size
    filled = int((host.segments > 0).sum() if isinstance(host, update.PackedBatch)
                 else host.input_mask.sum())
    return state, {"sft/loss": float(m["loss"]), "sft/target_tokens": tokens,
                   # Real tokens over the batch's token slots: what packing is for.
                   "sft/fill": filled / slots,
                   "sft/solutions_per_min": ctx.cfg.sft.batch_size * 60 / elapsed,
                   "grad_norm": float(m["grad_norm"]),
                   "tokens_per_s": tokens / elapsed, "step_time_s": elapsed,
                   "skipped": int(not bool(m["finite"]))}
