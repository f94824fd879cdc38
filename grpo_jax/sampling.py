"""Choosing a token from the logits: greedy, temperature, top-k, top-p.

Each row draws with its own key, so a row's sample depends only on that key and
its own logits, never on the batch around it. Logits are vocabulary-major [V, B]
(`vocab_major_logits`): the reductions over the vocabulary then run with vector
lanes across the batch on XLA:CPU.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from grpo_jax.config import SamplerConfig
from grpo_jax.model.config import ModelConfig
from grpo_jax.model import gemma3
from grpo_jax.model.matmul import matmul
from grpo_jax.kernels.cpu import amx

# top_p without top_k first looks for the nucleus among this many most likely tokens;
# only a step where some row's nucleus is wider pays for a full sort of the vocabulary.
TOP_P_CANDIDATES = 1024


def row_keys(key: jax.Array, ids: jax.Array) -> jax.Array:
    """Each row's key: fold_in(key, its id) for ids [B]."""
    return jax.vmap(jax.random.fold_in, (None, 0))(key, ids)


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
    [V, B] run several times faster than over [B, V] (and the matmul is no slower).
    With the AMX kernels, the embedding streams through AMX tiles as stored."""
    if cfg.cpu_kernels == "amx":
        return amx.rows_matmul(hidden.astype(cfg.compute_dtype), params["embed"])
    return matmul("bd,vd->vb", hidden, params["embed"], cfg.compute_dtype, jnp.float32,
                  impl=cfg.matmul_impl)


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
