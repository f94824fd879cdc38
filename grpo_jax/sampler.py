"""Autoregressive sampling.

`sample_uncached` recomputes the whole sequence at every step. It is the simple,
obviously-correct path (and the baseline the KV-cached sampler is measured and
tested against); it keeps fixed shapes: prompts are left-padded to a bucketed
length and generation is padded to the token budget, and a `lax.while_loop`
exits once every row has stopped.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.config import ModelConfig
from grpo_jax.model import gemma3
from grpo_jax.tokenizer import PAD_ID, STOP_IDS


class SampleOutput(NamedTuple):
    tokens: jax.Array      # [B, N] int32, PAD after a row's stop token
    logprobs: jax.Array    # [B, N] float32 log-softmax (temperature 1) of each token; 0 after stop
    lengths: jax.Array     # [B] int32 completion length, stop token included
    stopped: jax.Array     # [B] bool: ended on a stop token (False: hit the budget)


def bucket_length(n: int, multiple: int = 32) -> int:
    """Round a prompt length up so a run compiles for a handful of shapes only."""
    return max(multiple, -(-n // multiple) * multiple)


def left_pad(prompts: Sequence[Sequence[int]], length: int | None = None,
             ) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to `length` (default: bucketed longest). -> tokens, mask."""
    if not prompts:
        raise ValueError("no prompts to pad")
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("empty prompt: every prompt needs at least one token (BOS)")
    length = bucket_length(longest) if length is None else length
    if longest > length:
        raise ValueError(f"prompt of {longest} tokens exceeds the padded length {length}")
    tokens = np.full((len(prompts), length), PAD_ID, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, p in enumerate(prompts):
        tokens[row, length - len(p):] = p
        mask[row, length - len(p):] = True
    return tokens, mask


def _choose(logits: jax.Array, key: jax.Array, temperature: float) -> jax.Array:
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "stop_ids"))
def sample_uncached(params: gemma3.Params, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                    key: jax.Array, *, cfg: ModelConfig, max_new_tokens: int,
                    temperature: float = 0.0, stop_ids: tuple[int, ...] = STOP_IDS,
                    ) -> SampleOutput:
    """Sample up to `max_new_tokens` per row, recomputing the full forward each step.

    prompt_tokens/prompt_mask [B, P]: left-padded prompts. temperature 0 = greedy.
    """
    batch, prompt_len = prompt_tokens.shape
    tokens = jnp.concatenate(
        [prompt_tokens, jnp.full((batch, max_new_tokens), PAD_ID, jnp.int32)], axis=1)
    valid = jnp.concatenate([prompt_mask, jnp.zeros((batch, max_new_tokens), bool)], axis=1)
    stop = jnp.asarray(stop_ids, jnp.int32)

    def cond(state):
        step, _, _, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tokens, valid, out_tokens, out_logprobs, done, lengths = state
        positions = gemma3.left_padded_positions(valid)
        hidden = gemma3.hidden_states(params, tokens, positions, valid, cfg)
        last = jax.lax.dynamic_index_in_dim(hidden, prompt_len + step - 1, axis=1, keepdims=False)
        logits = gemma3.logits_from_hidden(params, last, cfg)  # [B, V] float32
        next_token = _choose(logits, jax.random.fold_in(key, step), temperature)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1),
                                      next_token[:, None], axis=-1)[:, 0]
        next_token = jnp.where(done, PAD_ID, next_token)
        logprob = jnp.where(done, 0.0, logprob)
        tokens = tokens.at[:, prompt_len + step].set(next_token)
        valid = valid.at[:, prompt_len + step].set(~done)
        out_tokens = out_tokens.at[:, step].set(next_token)
        out_logprobs = out_logprobs.at[:, step].set(logprob)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(next_token, stop)
        return step + 1, tokens, valid, out_tokens, out_logprobs, done, lengths

    state = (jnp.int32(0), tokens, valid,
             jnp.full((batch, max_new_tokens), PAD_ID, jnp.int32),
             jnp.zeros((batch, max_new_tokens), jnp.float32),
             jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32))
    _, _, _, out_tokens, out_logprobs, done, lengths = jax.lax.while_loop(cond, body, state)
    return SampleOutput(out_tokens, out_logprobs, lengths, done)
