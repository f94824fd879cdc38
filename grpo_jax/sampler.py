"""Batched autoregressive sampling with a KV cache and group fan-out.

`sample` prefills each distinct prompt once, fans its cache out to `group` rows
(GRPO's G samples per prompt), then decodes one token per row per step inside a
`lax.while_loop` that exits as soon as every row has stopped. Prefill and decode
are two jitted programs (so they can be timed apart); the decode program takes
the cache donated and updates it in place.

Randomness is per row: row r at step t draws from fold_in(fold_in(key, r), t), so
a row's sample depends only on the key, its row index and its own logits, never
on the batch around it; fan-out and G separate prefills give the same samples.

`sample_uncached` recomputes the full sequence at every step: the simple,
obviously-correct path the cached one is tested and benchmarked against.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax import sharding, stop_strings as stop_strings_lib
from grpo_jax.config import SamplerConfig
from grpo_jax.model.config import ModelConfig
from grpo_jax.model import gemma3, kv_cache, lora as lora_lib
from grpo_jax.tokenizer import PAD_ID

# top_p without top_k first looks for the nucleus among this many most likely tokens;
# only a step where some row's nucleus is wider pays for a full sort of the vocabulary.
TOP_P_CANDIDATES = 1024


class SampleOutput(NamedTuple):
    tokens: jax.Array             # [B, N] int32, PAD after a row's stop token
    logprobs: jax.Array           # [B, N] float32 log-softmax at temperature 1 (full vocab); 0 after stop
    sampling_logprobs: jax.Array  # [B, N] log-prob under the distribution sampled from
                                  # (temperature, top-k, top-p applied); 0 when greedy
    lengths: jax.Array            # [B] int32 completion length, stop token included
    stopped: jax.Array            # [B] bool: ended on a stop token or string (False: hit the budget)
    steps: jax.Array              # [] int32 decode steps run (the loop exits once all rows stop)


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
# Choosing a token


def row_keys(key: jax.Array, batch: int) -> jax.Array:
    return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(batch))


def _sample_candidates(scaled: jax.Array, keys: jax.Array, sampling: SamplerConfig,
                       num_candidates: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k / top-p among the `num_candidates` most likely tokens.

    -> token, its log-prob under the truncated distribution, and whether the
    candidates held each row's whole nucleus (always true when top_k is set).
    """
    vals, idx = jax.lax.top_k(scaled, num_candidates)  # sorted, descending
    keep = jnp.ones(vals.shape, bool)
    covered = jnp.ones(vals.shape[:1], bool)
    if sampling.top_p < 1.0:
        # With top_k the nucleus is taken within the renormalised top-k (as HF does);
        # without it, candidates carry their full-vocabulary probabilities.
        norm = jax.nn.logsumexp(vals if sampling.top_k else scaled, axis=-1, keepdims=True)
        probs = jnp.exp(vals - norm)
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = before < sampling.top_p  # the top token is always kept
        covered = jnp.sum(probs, axis=-1) >= sampling.top_p
    masked = jnp.where(keep, vals, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(keys, masked)
    token = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
    chosen = jnp.take_along_axis(masked, choice[:, None], axis=-1)[:, 0]
    return token, chosen - jax.nn.logsumexp(masked, axis=-1), covered


def vocab_major_logits(params: gemma3.Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """float32 logits [V, B] of hidden [B, D]. Vocabulary-major because XLA:CPU reduces
    over the major axis with vector lanes across the batch: max / sum-exp over
    [V, B] run several times faster than over [B, V] (and the matmul is no slower)."""
    return jnp.einsum("bd,vd->vb", hidden, params["embed"].astype(cfg.compute_dtype),
                      preferred_element_type=jnp.float32)


def _chunk_size(vocab: int) -> int:
    """A power-of-two divisor of the vocabulary near its square root (1 if odd)."""
    size = 1 << math.isqrt(vocab).bit_length()
    while vocab % size:
        size //= 2
    return size


def _pick_in_chunks(logits: jax.Array, chunk_scores: jax.Array, keys: jax.Array | None,
                    size: int) -> jax.Array:
    """Choose a chunk per row from chunk_scores [V/size, B] (argmax, or a categorical draw
    when keys are given), then a token inside it; -> token ids [B]."""
    batch = logits.shape[1]
    chunks = logits.reshape(-1, size, batch)
    if keys is None:
        chunk = jnp.argmax(chunk_scores, axis=0)
    else:
        chunk = jax.vmap(jax.random.categorical)(keys[:, 0], chunk_scores.T)
    inside = chunks[chunk, :, jnp.arange(batch)]  # [B, size]
    pick = (jnp.argmax(inside, axis=-1) if keys is None
            else jax.vmap(jax.random.categorical)(keys[:, 1], inside))
    return (chunk * size + pick).astype(jnp.int32)


def _split_two(keys: jax.Array) -> jax.Array:
    """[B] keys -> [B, 2]: one for the chunk draw, one for the draw inside it."""
    return jax.vmap(lambda k: jax.random.split(k, 2))(keys)


def _token_logit(logits: jax.Array, token: jax.Array) -> jax.Array:
    return logits[token, jnp.arange(logits.shape[1])]


def choose_tokens(logits: jax.Array, keys: jax.Array, sampling: SamplerConfig,
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits [V, B] float32 (vocabulary-major), keys [B] -> token [B], its log-prob at
    temperature 1, and its log-prob under the distribution sampled from.

    Greedy and plain temperature sampling read the vocabulary in two passes (chunk
    maxima, then exp-sums), never draw V random numbers: a token is drawn as a
    chunk (by its probability mass) then a token within the chunk, which is exactly
    the categorical distribution. Top-k / top-p sort at most TOP_P_CANDIDATES per
    row unless some row's nucleus is wider.
    """
    vocab, _ = logits.shape
    size = _chunk_size(vocab)
    chunk_max = jnp.max(logits.reshape(-1, size, logits.shape[1]), axis=1)  # [V/size, B]
    top = jnp.max(chunk_max, axis=0)
    exp_sums = jnp.sum(jnp.exp(logits - top).reshape(chunk_max.shape[0], size, -1), axis=1)
    lse = top + jnp.log(jnp.sum(exp_sums, axis=0))
    if sampling.greedy:
        token = _pick_in_chunks(logits, chunk_max, None, size)
        return token, _token_logit(logits, token) - lse, jnp.zeros(token.shape, jnp.float32)

    if sampling.top_k or sampling.top_p < 1.0:
        scaled = (logits / sampling.temperature).T  # [B, V]: top_k works on the last axis
        if sampling.top_k:
            token, sampling_lp, _ = _sample_candidates(
                scaled, keys, sampling, min(sampling.top_k, vocab))
        else:
            few = min(TOP_P_CANDIDATES, vocab)
            token, sampling_lp, covered = _sample_candidates(scaled, keys, sampling, few)
            token, sampling_lp = jax.lax.cond(
                jnp.all(covered) | (few == vocab),
                lambda: (token, sampling_lp),
                lambda: _sample_candidates(scaled, keys, sampling, vocab)[:2])
        token = token.astype(jnp.int32)
    elif sampling.temperature == 1.0:
        token = _pick_in_chunks(logits, jnp.log(exp_sums), _split_two(keys), size)
        sampling_lp = _token_logit(logits, token) - lse
    else:
        scaled = logits / sampling.temperature
        scaled_top = top / sampling.temperature
        scaled_sums = jnp.sum(jnp.exp(scaled - scaled_top).reshape(exp_sums.shape[0], size, -1),
                              axis=1)
        token = _pick_in_chunks(scaled, jnp.log(scaled_sums), _split_two(keys), size)
        sampling_lp = (_token_logit(scaled, token) - scaled_top
                       - jnp.log(jnp.sum(scaled_sums, axis=0)))
    return token, _token_logit(logits, token) - lse, sampling_lp


class Record(NamedTuple):
    """What each row has chosen so far ([B, N], N = max_new_tokens, or [B])."""
    tokens: jax.Array             # [B, N] int32, PAD past the row's length
    logprobs: jax.Array           # [B, N] float32, temperature-1 log-probs
    sampling_logprobs: jax.Array  # [B, N] float32, log-probs under the sampling transform
    lengths: jax.Array            # [B] int32: tokens chosen, the next one's column
    done: jax.Array               # [B] bool: stopped on a stop token or string
    stop_state: jax.Array         # [B] int32: each row's stop-string automaton state


def empty_record(batch: int, steps: int) -> Record:
    return Record(jnp.full((batch, steps), PAD_ID, jnp.int32),
                  jnp.zeros((batch, steps), jnp.float32), jnp.zeros((batch, steps), jnp.float32),
                  jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool),
                  jnp.zeros((batch,), jnp.int32))


def record_choice(rec: Record, logits: jax.Array, keys: jax.Array, live: jax.Array,
                  sampling: SamplerConfig, stop_table: jax.Array | None
                  ) -> tuple[Record, jax.Array]:
    """Each `live` row chooses its next token from `logits` [V, B] with the key
    fold_in(its key, its length) and writes it at its own column; the other rows get
    PAD and keep their record. A row is done after a stop token, or a token that
    completes a stop string. Rows decoding in lockstep share the column; a slot of the
    continuous-batching stream has its own."""
    steps = rec.tokens.shape[1]
    step_keys = jax.vmap(jax.random.fold_in)(keys, rec.lengths)
    token, lp, slp = choose_tokens(logits, step_keys, sampling)
    token = jnp.where(live, token, PAD_ID)
    stops = jnp.isin(token, jnp.asarray(sampling.stop_ids, jnp.int32))
    stop_state = rec.stop_state
    if stop_table is not None:
        new_state, matched = stop_strings_lib.advance(stop_table, stop_state, token)
        stop_state = jnp.where(live, new_state, stop_state)
        stops = stops | matched
    # Rows that are not live write to an out-of-range column, which the scatter drops.
    row = jnp.arange(token.shape[0])
    column = jnp.where(live, rec.lengths, steps)
    rec = Record(rec.tokens.at[row, column].set(token, mode="drop"),
                 rec.logprobs.at[row, column].set(lp, mode="drop"),
                 rec.sampling_logprobs.at[row, column].set(slp, mode="drop"),
                 rec.lengths + live.astype(jnp.int32), rec.done | (live & stops), stop_state)
    return rec, token


def _output(rec: Record, steps: jax.Array) -> SampleOutput:
    return SampleOutput(rec.tokens, rec.logprobs, rec.sampling_logprobs, rec.lengths, rec.done,
                        steps)


# ---------------------------------------------------------------------------
# KV-cached sampler


def _prefill(params: gemma3.Params, lora, prompt_tokens: jax.Array, prompt_mask: jax.Array, *,
             cfg: ModelConfig, cache_len: int, group: int = 1
             ) -> tuple[jax.Array, kv_cache.KVCache]:
    """Prefill each distinct prompt once; fan cache and last logits out to `group` rows each.

    -> logits [V, P*G] float32 (vocabulary-major) of every row's next token, and the cache.
    """
    hidden, cache = kv_cache.prefill(params, prompt_tokens, prompt_mask, cfg, cache_len, lora)
    logits = vocab_major_logits(params, hidden, cfg)
    if group > 1:
        cache = kv_cache.repeat_rows(cache, group)
        logits = jnp.repeat(logits, group, axis=1)
    return logits, cache


def _decode(params: gemma3.Params, lora, cache: kv_cache.KVCache, logits: jax.Array,
            key: jax.Array, stop_table: jax.Array | None = None, *, cfg: ModelConfig,
            sampling: SamplerConfig) -> tuple[SampleOutput, kv_cache.KVCache]:
    """Decode from prefilled `cache` and first-token `logits` until all rows stop.

    The cache is donated and returned (the loop writes into the same buffers).
    `stop_table`: `stop_strings.stop_table` of the stop strings (None: none).
    """
    batch = logits.shape[1]
    steps = sampling.max_new_tokens
    keys = row_keys(key, batch)
    rec = empty_record(batch, steps)
    rec, token = record_choice(rec, logits, keys, ~rec.done, sampling, stop_table)

    def cond(state):
        step, _, _, rec = state
        return (step < steps) & ~jnp.all(rec.done)

    def body(state):
        step, token, cache, rec = state
        hidden, cache = kv_cache.decode_step(params, cache, token, cfg, lora)
        rec, token = record_choice(rec, vocab_major_logits(params, hidden, cfg), keys,
                                   ~rec.done, sampling, stop_table)
        return step + 1, token, cache, rec

    steps, _, cache, rec = jax.lax.while_loop(cond, body, (jnp.int32(1), token, cache, rec))
    return _output(rec, steps), cache


prefill = jax.jit(_prefill, static_argnames=("cfg", "cache_len", "group"))
decode = jax.jit(_decode, static_argnames=("cfg", "sampling"), donate_argnames=("cache",))


@functools.lru_cache(maxsize=32)
def sharded_programs(cfg: ModelConfig, sampling: SamplerConfig, cache_len: int, group: int,
                     plan: sharding.MeshPlan) -> tuple[sharding.ShardedJit, sharding.ShardedJit]:
    """(prefill, decode) for a mesh, with explicit in/out shardings: weights and adapters
    by their logical axes, prompt rows and the cache over data x fsdp (the cache that
    decode takes is donated and comes back with the same sharding), logits [V, B] with
    rows sharded, the key and stop table replicated."""
    params_sh = gemma3.param_shardings(plan, cfg)
    cache_sh = kv_cache.cache_shardings(plan, cfg)
    logits_sh = plan.sharding((None, "batch"))
    out_sh = SampleOutput(*[plan.rows] * 5, plan.replicated)

    def prefill_fn(params, lora, prompt_tokens, prompt_mask):
        return _prefill(params, lora, prompt_tokens, prompt_mask, cfg=cfg, cache_len=cache_len,
                        group=group)

    def decode_fn(params, lora, cache, logits, key, stop_table):
        return _decode(params, lora, cache, logits, key, stop_table, cfg=cfg, sampling=sampling)

    def prefill_shardings(params, lora, *_):
        lora_sh = lora_lib.lora_shardings(plan, cfg, lora)
        return (params_sh, lora_sh, plan.rows, plan.rows), (logits_sh, cache_sh)

    def decode_shardings(params, lora, cache, logits, key, stop_table):
        lora_sh = lora_lib.lora_shardings(plan, cfg, lora)
        table_sh = None if stop_table is None else plan.replicated
        return ((params_sh, lora_sh, cache_sh, logits_sh, plan.replicated, table_sh),
                (out_sh, cache_sh))

    return (sharding.sharded_jit(plan, prefill_fn, prefill_shardings),
            sharding.sharded_jit(plan, decode_fn, decode_shardings, donate_argnums=(2,)))


def sample(params: gemma3.Params, prompt_tokens: jax.Array, prompt_mask: jax.Array,
           key: jax.Array, *, cfg: ModelConfig, sampling: SamplerConfig, group: int = 1,
           lora=None, max_cache_len: int | None = None,
           stop_table: jax.Array | None = None,
           plan: sharding.MeshPlan | None = None) -> SampleOutput:
    """Sample `group` completions for each left-padded prompt row [P, L] -> [P*group] rows
    (prompt-major: rows g*... of prompt p are p*group .. p*group+group-1).
    `sampling.stop_strings` need `stop_table` (`stop_strings.stop_table`): the sampler
    sees token ids only. plan: a device mesh (`sharded_programs`); the prompt rows
    must divide over its data x fsdp devices."""
    if sampling.stop_strings and stop_table is None:
        raise ValueError("sampling.stop_strings are set but no stop_table was given "
                         "(stop_strings.stop_table(tokenizer, strings, vocab_size))")
    check_group(prompt_tokens.shape[0] * group, group)
    cache_len = prompt_tokens.shape[1] + sampling.max_new_tokens
    if max_cache_len is not None and cache_len > max_cache_len:
        raise ValueError(
            f"prompt length {prompt_tokens.shape[1]} + {sampling.max_new_tokens} new tokens "
            f"exceeds the cache length {max_cache_len}")
    if plan is not None:
        sharded_prefill, sharded_decode = sharded_programs(cfg, sampling, cache_len, group, plan)
        logits, cache = sharded_prefill(params, lora, prompt_tokens, prompt_mask)
        return sharded_decode(params, lora, cache, logits, key, stop_table)[0]
    logits, cache = prefill(params, lora, prompt_tokens, prompt_mask, cfg=cfg,
                            cache_len=cache_len, group=group)
    out, _ = decode(params, lora, cache, logits, key, stop_table, cfg=cfg, sampling=sampling)
    return out


def sample_prompts(params: gemma3.Params, prompts: Sequence[Sequence[int]], key: jax.Array, *,
                   cfg: ModelConfig, sampling: SamplerConfig, group: int = 1, lora=None,
                   max_cache_len: int | None = None,
                   stop_table: jax.Array | None = None) -> SampleOutput:
    """Token lists in, NumPy arrays out, with prompt length and count bucketed.

    Filler rows (copies of the last prompt) come after the real ones, so the real
    rows' keys, and hence their samples, do not depend on the bucket.
    """
    n = len(prompts)
    padded = list(prompts) + [prompts[-1]] * (bucket_batch(n) - n) if prompts else []
    tokens, mask = left_pad(padded, multiple=sampling.prompt_bucket)
    out = sample(params, jnp.asarray(tokens), jnp.asarray(mask), key, cfg=cfg,
                 sampling=sampling, group=group, lora=lora, max_cache_len=max_cache_len,
                 stop_table=stop_table)
    return SampleOutput(*(np.asarray(x)[:n * group] if np.ndim(x) else np.asarray(x)
                          for x in out))


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


# ---------------------------------------------------------------------------
# Uncached baseline


@functools.partial(jax.jit, static_argnames=("cfg", "sampling"))
def sample_uncached(params: gemma3.Params, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                    key: jax.Array, *, cfg: ModelConfig, sampling: SamplerConfig,
                    lora=None, stop_table: jax.Array | None = None) -> SampleOutput:
    """The same sampling, recomputing the whole padded sequence at every step.

    Same token choice and per-row keys as `sample`, so the two agree token for token.
    """
    batch, prompt_len = prompt_tokens.shape
    steps = sampling.max_new_tokens
    tokens = jnp.concatenate(
        [prompt_tokens, jnp.full((batch, steps), PAD_ID, jnp.int32)], axis=1)
    valid = jnp.concatenate([prompt_mask, jnp.zeros((batch, steps), bool)], axis=1)
    keys = row_keys(key, batch)

    def cond(state):
        step, _, _, rec = state
        return (step < steps) & ~jnp.all(rec.done)

    def body(state):
        step, tokens, valid, rec = state
        positions = gemma3.left_padded_positions(valid)
        hidden = gemma3.hidden_states(params, tokens, positions, valid, cfg, lora)
        last = jax.lax.dynamic_index_in_dim(hidden, prompt_len + step - 1, axis=1, keepdims=False)
        logits = vocab_major_logits(params, last, cfg)
        was_done = rec.done
        rec, token = record_choice(rec, logits, keys, ~was_done, sampling, stop_table)
        tokens = tokens.at[:, prompt_len + step].set(token)
        valid = valid.at[:, prompt_len + step].set(~was_done)
        return step + 1, tokens, valid, rec

    step, _, _, rec = jax.lax.while_loop(
        cond, body, (jnp.int32(0), tokens, valid, empty_record(batch, steps)))
    return _output(rec, step)


def model_flops_per_token(cfg: ModelConfig, context: float, logits: bool = True) -> float:
    """Matmul FLOPs of one token: 2 x the weights it multiplies (the layers, plus the
    tied logits when computed; the embedding lookup is free) + attention over
    `context` earlier positions (capped by each layer's window)."""
    d, h, k, dh, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffw_dim
    per_layer = d * (h + 2 * k) * dh + h * dh * d + 3 * d * f
    attn = sum(4 * h * dh * min(context, gemma3.layer_window(cfg, i) or math.inf)
               for i in range(cfg.num_layers))
    return 2.0 * (cfg.num_layers * per_layer + logits * cfg.vocab_size * d) + attn
