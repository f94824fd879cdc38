"""Continuous batching: many prompts through a fixed set of decode slots.

`sampler.sample_prompts` decodes a batch until its *longest* row stops, so rows
that stopped early keep paying for a full step each. On held-out evaluation that
is most of the work: a trained model's answers are ~60 tokens, the budget is
~200, and a batch of 64 almost always holds one row that runs to the budget.

`sample_stream` keeps `slots` rows decoding together; as soon as `refill` of them
have stopped, their results are taken and the next `refill` prompts are
prefilled into those rows of the same cache (the cache addresses every row by its
own position, and a fresh row's stale slots are masked until written, see
`kernels.reference.cache_mask`). Two programs are compiled, whatever the number of prompts:
the insert (prefill `refill` prompts, choose their first tokens, scatter them into
their rows) and the decode loop (run until enough rows have stopped).

Each prompt's tokens depend only on its own logits and on a key derived from its
index in `prompts` (fold_in(fold_in(key, index), token position)), exactly as row
`index` of `sampler.sample` draws them, so the stream and one big batch give the
same samples, greedy or not.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax import sampler
from grpo_jax.config import SamplerConfig
from grpo_jax.model.config import ModelConfig
from grpo_jax.model import gemma3, kv_cache
from grpo_jax.tokenizer import PAD_ID


class _Rows(NamedTuple):
    """Per-slot decode state: what each slot's prompt has chosen so far, and how to go on."""
    rec: sampler.Record  # tokens, log-probs, lengths, stopped (rec.done), stop-string state
    last: jax.Array      # [S] int32: the token to feed next
    keys: jax.Array      # [S] the row's prompt key: fold_in(key, prompt index)

    def finished(self) -> jax.Array:
        """[S] bool: stopped, or reached the token budget."""
        return self.rec.done | (self.rec.lengths >= self.rec.tokens.shape[1])


def _empty_rows(steps: int, keys: jax.Array) -> _Rows:
    return _Rows(sampler.empty_record(keys.shape[0], steps),
                 jnp.full((keys.shape[0],), PAD_ID, jnp.int32), keys)


def _choose(rows: _Rows, logits: jax.Array, live: jax.Array, sampling: SamplerConfig,
            stop_table: jax.Array | None) -> _Rows:
    """Each live row chooses its next token from `logits` [V, S] and writes it down."""
    rec, token = sampler.record_choice(rows.rec, logits, rows.keys, live, sampling, stop_table)
    return rows._replace(rec=rec, last=jnp.where(live, token, rows.last))


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "cache_len"),
                   donate_argnames=("cache", "rows"))
def _insert(params, lora, cache: kv_cache.KVCache, rows: _Rows, prompt_tokens: jax.Array,
            prompt_mask: jax.Array, slot_ids: jax.Array, prompt_ids: jax.Array, key: jax.Array,
            stop_table: jax.Array | None, *, cfg: ModelConfig, sampling: SamplerConfig,
            cache_len: int) -> tuple[kv_cache.KVCache, _Rows]:
    """Prefill prompts [R, L] into slots `slot_ids` [R] (an id >= S: filler, dropped) and
    choose their first tokens; `prompt_ids` [R] key their randomness."""
    steps = rows.rec.tokens.shape[1]
    hidden, fresh = kv_cache.prefill(params, prompt_tokens, prompt_mask, cfg, cache_len, lora)
    logits = sampler.vocab_major_logits(params, hidden, cfg)
    cache = jax.tree.map(lambda c, f: c.at[slot_ids].set(f.astype(c.dtype), mode="drop"),
                         cache, fresh)
    new = _empty_rows(steps, jax.vmap(jax.random.fold_in, (None, 0))(key, prompt_ids))
    new = _choose(new, logits, jnp.ones(prompt_ids.shape, bool), sampling, stop_table)
    rows = jax.tree.map(lambda r, f: r.at[slot_ids].set(f, mode="drop"), rows, new)
    return cache, rows


@functools.partial(jax.jit, static_argnames=("cfg", "sampling"),
                   donate_argnames=("cache", "rows"))
def _decode_until(params, lora, cache: kv_cache.KVCache, rows: _Rows, active: jax.Array,
                  need: jax.Array, stop_table: jax.Array | None, *, cfg: ModelConfig,
                  sampling: SamplerConfig) -> tuple[kv_cache.KVCache, _Rows, jax.Array]:
    """Decode the active rows until `need` of them are done (or all are).
    -> cache, rows, decode steps run."""

    def cond(state):
        _, rows, _ = state
        finished = rows.finished()
        return jnp.any(active & ~finished) & (jnp.sum(active & finished) < need)

    def body(state):
        cache, rows, steps = state
        hidden, cache = kv_cache.decode_step(params, cache, rows.last, cfg, lora)
        logits = sampler.vocab_major_logits(params, hidden, cfg)
        return (cache, _choose(rows, logits, active & ~rows.finished(), sampling, stop_table),
                steps + 1)

    return jax.lax.while_loop(cond, body, (cache, rows, jnp.int32(0)))


def sample_stream(params: gemma3.Params, prompts: Sequence[Sequence[int]], key: jax.Array, *,
                  cfg: ModelConfig, sampling: SamplerConfig, slots: int = 64,
                  refill: int | None = None, lora=None, stop_table: jax.Array | None = None
                  ) -> sampler.SampleOutput:
    """One completion per prompt, in prompt order, as NumPy arrays (`steps`: decode steps
    run in all). `slots` rows decode together; a prompt enters as soon as `refill`
    (default slots // 8) rows are free. Every prompt is left-padded to the bucket of
    the longest, so the two programs compile once per stream."""
    if sampling.stop_strings and stop_table is None:
        raise ValueError("sampling.stop_strings are set but no stop_table was given "
                         "(stop_strings.stop_table(tokenizer, strings, vocab_size))")
    n = len(prompts)
    if n == 0:
        raise ValueError("no prompts to sample")
    if slots <= 0 or (refill is not None and refill <= 0):
        raise ValueError(f"slots ({slots}) and refill ({refill}) must be positive")
    slots = min(slots, sampler.bucket_batch(n))
    refill = min(refill or max(1, slots // 8), slots)
    prompt_len = sampler.left_pad(prompts, multiple=sampling.prompt_bucket)[0].shape[1]
    steps = sampling.max_new_tokens
    cache = kv_cache.init_cache(cfg, slots, prompt_len + steps)
    rows = _empty_rows(steps, sampler.row_keys(key, slots))
    owner = np.full(slots, -1)  # the prompt each slot holds (-1: free)
    out_tokens = np.full((n, steps), PAD_ID, np.int32)
    out_lp = np.zeros((n, steps), np.float32)
    out_slp = np.zeros((n, steps), np.float32)
    out_len = np.zeros(n, np.int32)
    out_stopped = np.zeros(n, bool)
    next_prompt, taken, decode_steps = 0, 0, 0
    while taken < n:
        # Fill free slots, `refill` prompts at a time (the last group padded with filler).
        while next_prompt < n and np.sum(owner < 0) >= min(refill, n - next_prompt):
            ids = list(range(next_prompt, min(next_prompt + refill, n)))
            free = np.flatnonzero(owner < 0)[:len(ids)]
            pad = refill - len(ids)
            tokens, mask = sampler.left_pad([prompts[i] for i in ids] + [prompts[ids[-1]]] * pad,
                                            prompt_len)
            slot_ids = np.concatenate([free, np.full(pad, slots)]).astype(np.int32)
            prompt_ids = np.asarray(ids + [ids[-1]] * pad, np.int32)
            cache, rows = _insert(params, lora, cache, rows, jnp.asarray(tokens),
                                  jnp.asarray(mask), jnp.asarray(slot_ids),
                                  jnp.asarray(prompt_ids), key, stop_table, cfg=cfg,
                                  sampling=sampling, cache_len=prompt_len + steps)
            owner[free] = ids
            next_prompt += len(ids)
        active = owner >= 0
        remaining = n - next_prompt
        need = (max(min(refill, remaining) - int(np.sum(~active)), 1) if remaining
                else int(np.sum(active)))
        cache, rows, ran = _decode_until(params, lora, cache, rows, jnp.asarray(active),
                                         jnp.int32(need), stop_table, cfg=cfg, sampling=sampling)
        decode_steps += int(ran)
        # One transfer a segment: `need` >= 1 row has finished.
        host, finished = jax.device_get((rows.rec, rows.finished()))
        finished = np.flatnonzero(active & finished)
        if finished.size:
            ids = owner[finished]
            out_tokens[ids] = host.tokens[finished]
            out_lp[ids] = host.logprobs[finished]
            out_slp[ids] = host.sampling_logprobs[finished]
            out_len[ids] = host.lengths[finished]
            out_stopped[ids] = host.done[finished]
            owner[finished] = -1
            taken += finished.size
    return sampler.SampleOutput(out_tokens, out_lp, out_slp, out_len, out_stopped,
                                np.asarray(decode_steps, np.int32))
