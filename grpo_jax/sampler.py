"""The decode engine's two drivers (`decode.py` holds the engine).

`sample` (lockstep, GRPO's rollouts): prefill each distinct prompt once, fan its
cache out to `group` rows (GRPO's G samples per prompt), then decode one token per
row per step until every row has stopped. The decode program takes the cache
donated and updates it in place.

`sample_stream` (refill, evaluation): a fixed set of rows decodes together; as soon
as `refill` of them have finished, their results are taken and the next prompts are
prefilled into those rows of the same cache. A batch decodes until its *longest*
row stops, so in lockstep rows that stopped early keep paying for a full step each;
on held-out evaluation that is most of the work (a trained model's answers are ~60
tokens, the budget ~200, and a batch of 64 almost always holds a row that runs to
the budget).

Both run on a device mesh (`plan`; one device by default), several hosts included:
every host runs the same driver loop on the same prompts, feeds its own rows and
reads every row back (`sharding.to_host`). A prompt's samples depend only on the
key and its index, so both drivers give the same tokens for it.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from grpo_jax import decode, sharding, stop_strings as stop_strings_lib, tools as tools_lib
from grpo_jax.config import SamplerConfig
from grpo_jax.decode import SampleOutput
from grpo_jax.model.config import ModelConfig
from grpo_jax.model import gemma3
from grpo_jax.tokenizer import PAD_ID

__all__ = ["SampleOutput", "bucket_batch", "bucket_length", "check_group", "decode_completions",
           "left_pad", "sample", "sample_prompts", "sample_stream"]


# ---------------------------------------------------------------------------
# Shapes


def bucket_length(n: int, multiple: int = 32) -> int:
    """Round a prompt length up so a run compiles for a handful of shapes only."""
    return max(multiple, -(-n // multiple) * multiple)


def bucket_batch(n: int) -> int:
    """Row-count bucket: powers of two up to 8, then multiples of 8."""
    return 1 << (n - 1).bit_length() if n <= 8 else -(-n // 8) * 8


def check_group(batch: int, group: int) -> None:
    if group <= 0:
        raise ValueError(f"group size must be positive, got {group}")
    if batch % group:
        raise ValueError(f"batch {batch} is not divisible by the group size {group}")


def left_pad(prompts: Sequence[Sequence[int]], length: int | None = None, *,
             multiple: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to `length` (default: the bucketed longest). -> tokens, mask."""
    if not prompts:
        raise ValueError("no prompts to pad")
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("empty prompt: every prompt needs at least one token (BOS)")
    length = bucket_length(longest, multiple) if length is None else length
    if longest > length:
        raise ValueError(f"prompt of {longest} tokens exceeds the padded length {length}")
    tokens = np.full((len(prompts), length), PAD_ID, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, p in enumerate(prompts):
        tokens[row, length - len(p):] = p
        mask[row, length - len(p):] = True
    return tokens, mask


# ---------------------------------------------------------------------------
# Lockstep


def _check_tables(sampling: SamplerConfig, stop_table, toolbox) -> None:
    if sampling.stop_strings and stop_table is None:
        raise ValueError("sampling.stop_strings are set but no stop_table was given "
                         "(stop_strings.stop_table(tokenizer, strings, vocab_size))")
    if bool(sampling.tools) != (toolbox is not None):
        raise ValueError("sampling.tools and the toolbox disagree: pass "
                         "tools.toolbox(tokenizer, sampling, vocab_size) when (and only when) "
                         "sampling.tools is set")


def _call_table(toolbox):
    return None if toolbox is None else toolbox.table


def answer_calls(progs: decode.Programs, rows: decode.Rows, toolbox,
                 plan: sharding.MeshPlan) -> tuple[decode.Rows, int]:
    """Run the tool for every row that waits on one and hand the results to the rows
    (one read back, one upload). -> rows, calls answered."""
    if toolbox is None:
        return rows, 0
    tokens, lengths, policy, waiting = sharding.to_host(
        (rows.rec.tokens, rows.rec.lengths, rows.tool.policy, rows.waiting()))
    chosen = np.flatnonzero(waiting)
    if not chosen.size:
        return rows, 0
    slots, width = waiting.shape[0], rows.tool.queue.shape[1]
    queue = np.full((slots, width), PAD_ID, np.int32)
    queue_len = np.zeros(slots, np.int32)
    for r in chosen:
        ids = toolbox.result_ids(tokens[r, :lengths[r]], policy[r, :lengths[r]])
        queue[r, :len(ids)], queue_len[r] = ids, len(ids)
    rows = progs.feed(rows, *(sharding.put(x, plan.rows) for x in (waiting, queue, queue_len)))
    return rows, int(chosen.size)


def sample(params: gemma3.Params, prompt_tokens: jax.Array, prompt_mask: jax.Array,
           key: jax.Array, *, cfg: ModelConfig, sampling: SamplerConfig, group: int = 1,
           lora=None, max_cache_len: int | None = None,
           stop_table: jax.Array | None = None,
           plan: sharding.MeshPlan | None = None,
           toolbox: tools_lib.Toolbox | None = None) -> SampleOutput:
    """Sample `group` completions for each left-padded prompt row [P, L] -> [P*group] rows
    (prompt-major: the rows of prompt p are p*group .. p*group+group-1; row r draws
    with fold_in(key, r)). `sampling.stop_strings` need `stop_table`
    (`stop_strings.stop_table`): the sampler sees token ids only; `sampling.tools` need
    `toolbox` (`tools.toolbox`): the decode runs in segments, and between two the host
    answers the calls rows have completed. plan: the device mesh (default one device);
    the prompt rows must divide over its data x fsdp devices. `steps` counts the first
    token's choice as a step."""
    _check_tables(sampling, stop_table, toolbox)
    prompts = prompt_tokens.shape[0]
    check_group(prompts * group, group)
    cache_len = prompt_tokens.shape[1] + sampling.max_new_tokens
    if max_cache_len is not None and cache_len > max_cache_len:
        raise ValueError(
            f"prompt length {prompt_tokens.shape[1]} + {sampling.max_new_tokens} new tokens "
            f"exceeds the cache length {max_cache_len}")
    plan = plan or sharding.local_plan()
    sharding.check_rows(plan.config, prompts, "a sampled batch of prompts")
    progs = decode.programs(cfg, sampling, cache_len, group, plan)
    params, lora = decode.place_weights(params, lora, cfg, plan)
    rows = prompts * group
    tokens, mask, ids = (sharding.put(x, plan.rows) for x in (
        prompt_tokens, prompt_mask, np.arange(prompts, dtype=np.int32)))
    call_table = _call_table(toolbox)
    cache, state = progs.start(params, lora, tokens, mask, ids, key, stop_table, call_table)
    active = sharding.put(np.ones(rows, bool), plan.rows)
    need = sharding.put(np.int32(rows), plan.replicated)
    state, _ = answer_calls(progs, state, toolbox, plan)
    ran = 1
    while True:  # one segment without a tool; with one, a segment per round of calls
        cache, state, steps = progs.decode(params, lora, cache, state, active, need,
                                           stop_table, call_table)
        ran += steps
        state, answered = answer_calls(progs, state, toolbox, plan)
        if not answered:
            return state.output(ran)


def sample_prompts(params: gemma3.Params, prompts: Sequence[Sequence[int]], key: jax.Array, *,
                   cfg: ModelConfig, sampling: SamplerConfig, group: int = 1, lora=None,
                   max_cache_len: int | None = None,
                   stop_table: jax.Array | None = None,
                   plan: sharding.MeshPlan | None = None,
                   toolbox: tools_lib.Toolbox | None = None) -> SampleOutput:
    """Token lists in, NumPy arrays out, with prompt length and count bucketed.

    Filler rows (copies of the last prompt) come after the real ones, so the real
    rows' keys, and hence their samples, do not depend on the bucket.
    """
    n = len(prompts)
    plan = plan or sharding.local_plan()
    bucket = _round_up(bucket_batch(n), plan.row_devices) if n else 0
    padded = list(prompts) + [prompts[-1]] * (bucket - n) if prompts else []
    tokens, mask = left_pad(padded, multiple=sampling.prompt_bucket)
    out = sharding.to_host(sample(params, tokens, mask, key, cfg=cfg, sampling=sampling,
                                  group=group, lora=lora, max_cache_len=max_cache_len,
                                  stop_table=stop_table, plan=plan, toolbox=toolbox))
    return SampleOutput(*(x if x is None else np.asarray(x)[:n * group] if np.ndim(x)
                          else np.asarray(x) for x in out))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------
# Refill


def sample_stream(params: gemma3.Params, prompts: Sequence[Sequence[int]], key: jax.Array, *,
                  cfg: ModelConfig, sampling: SamplerConfig, slots: int = 64,
                  refill: int | None = None, lora=None, stop_table: jax.Array | None = None,
                  plan: sharding.MeshPlan | None = None,
                  toolbox: tools_lib.Toolbox | None = None) -> SampleOutput:
    """One completion per prompt, in prompt order, as NumPy arrays (`steps`: decode steps
    run in all). `slots` rows decode together; prompts enter `refill` at a time
    (default slots // 8) as soon as that many rows are free. Every prompt is
    left-padded to the bucket of the longest, so the programs compile once per stream.
    On a mesh, slots and refill are rounded up to multiples of its data x fsdp devices.
    With a tool (`toolbox`), the calls rows complete are answered between segments."""
    _check_tables(sampling, stop_table, toolbox)
    n = len(prompts)
    if n == 0:
        raise ValueError("no prompts to sample")
    if slots <= 0 or (refill is not None and refill <= 0):
        raise ValueError(f"slots ({slots}) and refill ({refill}) must be positive")
    plan = plan or sharding.local_plan()
    unit = plan.row_devices
    slots = _round_up(min(slots, bucket_batch(n)), unit)
    refill = _round_up(min(refill or max(1, slots // 8), slots), unit)
    prompt_len = left_pad(prompts, multiple=sampling.prompt_bucket)[0].shape[1]
    steps = sampling.max_new_tokens
    progs = decode.programs(cfg, sampling, prompt_len + steps, 1, plan)
    params, lora = decode.place_weights(params, lora, cfg, plan)

    def filled(chosen: list[int], rows: int) -> list[jax.Array]:
        """Prompts `chosen` and filler (copies of the last, id n) up to `rows` rows ->
        tokens, mask and prompt ids, placed as rows."""
        pad = rows - len(chosen)
        tokens, mask = left_pad([prompts[i] for i in chosen] + [prompts[chosen[-1]]] * pad,
                                prompt_len)
        ids = np.asarray(chosen + [n] * pad, np.int32)
        return [sharding.put(x, plan.rows) for x in (tokens, mask, ids)]

    # The first fill starts the state (its cache and rows come out of prefill); filler
    # rows beyond the prompts stay idle until a refill takes them.
    owner = np.full(slots, -1)  # the prompt each slot holds (-1: free)
    first = list(range(min(slots, n)))
    call_table = _call_table(toolbox)
    cache, rows = progs.start(params, lora, *filled(first, slots), key, stop_table, call_table)
    owner[:len(first)] = first
    next_prompt = len(first)
    tooled = toolbox is not None
    out = SampleOutput(np.full((n, steps), PAD_ID, np.int32), np.zeros((n, steps), np.float32),
                       np.zeros((n, steps), np.float32), np.zeros(n, np.int32),
                       np.zeros(n, bool), None, np.zeros((n, steps), bool) if tooled else None,
                       np.zeros(n, np.int32) if tooled else None)
    taken, decode_steps = 0, 0
    while taken < n:
        rows, _ = answer_calls(progs, rows, toolbox, plan)
        active = owner >= 0
        remaining = n - next_prompt
        # Run until enough rows finish to take the next `refill` prompts (or all, at the end).
        need = (max(min(refill, remaining) - int(np.sum(~active)), 1) if remaining
                else int(np.sum(active)))
        cache, rows, ran = progs.decode(params, lora, cache, rows,
                                        sharding.put(active, plan.rows),
                                        sharding.put(np.int32(need), plan.replicated),
                                        stop_table, call_table)
        # One transfer a segment: at least `need` rows have finished (or, with a tool,
        # some row waits for a result).
        host, tool, finished = sharding.to_host((rows.rec, rows.tool, rows.finished()))
        decode_steps += int(sharding.to_host(ran))
        finished = np.flatnonzero(active & finished)
        ids = owner[finished]
        values = (host.tokens, host.logprobs, host.sampling_logprobs, host.lengths, host.done)
        if tooled:
            values += (None, tool.policy, tool.calls)
        for field, value in zip(out, values):
            if value is not None:
                field[ids] = value[finished]
        owner[finished] = -1
        taken += finished.size
        # Fill free slots, `refill` prompts at a time (the last group padded with filler).
        while next_prompt < n and np.sum(owner < 0) >= min(refill, n - next_prompt):
            chosen = list(range(next_prompt, min(next_prompt + refill, n)))
            free = np.flatnonzero(owner < 0)[:len(chosen)]
            # Filler rows go to slot id `slots`, out of range: the insert drops them.
            slot_ids = np.concatenate([free, np.full(refill - len(chosen), slots)])
            cache, rows = progs.insert(params, lora, cache, rows, *filled(chosen, refill),
                                       sharding.put(slot_ids.astype(np.int32), plan.rows),
                                       key, stop_table, call_table)
            owner[free] = chosen
            next_prompt += len(chosen)
    return out._replace(steps=np.asarray(decode_steps, np.int32))


# ---------------------------------------------------------------------------
# Text


def decode_completions(tokenizer, out: SampleOutput, stop_strings: Sequence[str] = ()
                       ) -> list[str]:
    """Text of each row's completion (its first `lengths[i]` tokens; the tokenizer
    drops the stop token as a special token), cut after the first stop string: the
    token that completes one may carry text past it ('>.' of '</answer>.')."""
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    texts = [tokenizer.decode(tokens[i, :lengths[i]].tolist()) for i in range(len(lengths))]
    if stop_strings:
        texts = [stop_strings_lib.cut_after_stop(t, stop_strings) for t in texts]
    return texts
