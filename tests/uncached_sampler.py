"""The uncached sampler: the same token choice and per-row keys as the KV-cached
engine, recomputing the whole padded sequence at every step. The simple, obviously
correct path the engine is tested (tests/test_sampler.py) and benchmarked
(benchmarks/sampler_throughput.py) against."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from grpo_jax import decode, sampling as sampling_lib
from grpo_jax.config import SamplerConfig
from grpo_jax.model import gemma3
from grpo_jax.model.config import ModelConfig
from grpo_jax.tokenizer import PAD_ID


@functools.partial(jax.jit, static_argnames=("cfg", "sampling"))
def sample_uncached(params: gemma3.Params, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                    key: jax.Array, *, cfg: ModelConfig, sampling: SamplerConfig,
                    lora=None, stop_table: jax.Array | None = None) -> decode.SampleOutput:
    """The same sampling, recomputing the whole padded sequence at every step.

    Same token choice and per-row keys as `sampler.sample`, so the two agree token
    for token.
    """
    batch, prompt_len = prompt_tokens.shape
    steps = sampling.max_new_tokens
    tokens = jnp.concatenate(
        [prompt_tokens, jnp.full((batch, steps), PAD_ID, jnp.int32)], axis=1)
    valid = jnp.concatenate([prompt_mask, jnp.zeros((batch, steps), bool)], axis=1)
    keys = sampling_lib.row_keys(key, jnp.arange(batch))

    def cond(state):
        step, _, _, rec = state
        return (step < steps) & ~jnp.all(rec.done)

    def body(state):
        step, tokens, valid, rec = state
        positions = gemma3.left_padded_positions(valid)
        hidden = gemma3.hidden_states(params, tokens, positions, valid, cfg, lora)
        last = jax.lax.dynamic_index_in_dim(hidden, prompt_len + step - 1, axis=1, keepdims=False)
        logits = sampling_lib.vocab_major_logits(params, last, cfg)
        was_done = rec.done
        rec, token = decode.record_choice(rec, logits, keys, ~was_done, sampling, stop_table)
        tokens = tokens.at[:, prompt_len + step].set(token)
        valid = valid.at[:, prompt_len + step].set(~was_done)
        return step + 1, tokens, valid, rec

    step, _, _, rec = jax.lax.while_loop(
        cond, body, (jnp.int32(0), tokens, valid, decode.empty_record(batch, steps)))
    return decode.Rows(rec, None, None).output(step)
