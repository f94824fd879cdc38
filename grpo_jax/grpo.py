"""GRPO core: group-relative advantages, chunked per-token log-probs, the clipped loss.

Layout used throughout: a batch of N = num_prompts * group_size completions,
consecutive rows sharing a prompt. Completion arrays are [N, T] with T the
longest completion (right-padded); `mask` [N, T] marks real completion tokens.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax import sharding
# The choices, defined once in the config (default first). k3 and k2 are loss terms;
# k1 is a penalty on the reward (`kl_reward_penalty`) and adds nothing to the loss.
from grpo_jax.config import AGGREGATIONS, KL_ESTIMATORS, RATIO_LEVELS
from grpo_jax.model import gemma3, vocab_parallel
from grpo_jax.model.config import ModelConfig


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _concrete_float(x) -> float | None:
    return float(x) if _is_concrete(x) else None


# ---------------------------------------------------------------------------
# Advantages


def group_advantages(rewards, group_size: int, *, scale_by_std: bool = True,
                     eps: float = 1e-6):
    """(r - group mean) / (group sample std + eps) for each run of `group_size` rows.

    The std is the sample std (ddof=1), as TRL and Tunix use. `scale_by_std=False`
    keeps only the centring (Dr. GRPO: the std rescaling biases towards groups
    that are nearly all right or all wrong). A group whose rewards are all equal
    carries no signal and gets exactly 0 (not rounding noise divided by eps).
    NumPy rewards (the trainer's host side) are computed in NumPy, with no device
    round trip; JAX arrays (also under jit) in jnp. NaN checks need concrete
    values: under jit they are skipped.
    """
    xp = np if isinstance(rewards, (np.ndarray, list, tuple)) else jnp
    rewards = xp.asarray(rewards)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [num_completions], got shape {rewards.shape}")
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    n = rewards.shape[0]
    if n % group_size:
        raise ValueError(f"group_size={group_size} does not divide the batch of {n} rewards")
    if _is_concrete(rewards) and bool(xp.any(~xp.isfinite(rewards))):
        bad = np.flatnonzero(~np.isfinite(np.asarray(rewards))).tolist()
        raise ValueError(f"rewards contain NaN or inf at rows {bad}")
    if not xp.issubdtype(rewards.dtype, xp.floating):
        rewards = rewards.astype(xp.float32)

    groups = rewards.reshape(n // group_size, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    if scale_by_std:
        # ddof=1; a group of one has no spread, and is zeroed below anyway.
        var = xp.sum(centred * centred, axis=1, keepdims=True) / max(group_size - 1, 1)
        centred = centred / (xp.sqrt(var) + eps)
    flat = groups.max(axis=1, keepdims=True) == groups.min(axis=1, keepdims=True)
    return xp.where(flat, 0.0, centred).reshape(n)


# ---------------------------------------------------------------------------
# Log-probs


def per_token_logprobs(params: gemma3.Params, lora, tokens: jax.Array, input_mask: jax.Array,
                       prompt_len: int, cfg: ModelConfig, *, positions: jax.Array | None = None,
                       chunk_size: int = 256, temperature: float = 1.0,
                       return_entropy: bool = False, group: int = 1):
    """Teacher-forced log p(completion token | everything before it), [N, T] float32.

    tokens [N, prompt_len + T]: the left-padded prompt, then the completion
    (right-padded). input_mask [N, prompt_len + T]: True on real tokens. lora:
    a `LoraWeights` for the policy, or None for the reference (the same base
    weights with the adapters off: no second model copy).

    The hidden states are computed once; the vocabulary projection runs over
    time in chunks of about `chunk_size` positions (chunk_size // N steps of every
    row), each under jax.checkpoint, so neither the forward nor the backward pass
    holds more than ~[chunk_size, V] logits (the full [N, T, V] never exists). Under
    a mesh (`jax.set_mesh`) the rows stay sharded and the vocabulary is split over
    `tensor` (`vocab_parallel.logprobs`). Padding positions
    get finite garbage: mask them downstream.

    group > 1: rows come in consecutive groups of `group` completions of one
    prompt (identical prompt tokens and mask, as GRPO samples them). Each group
    is then packed into one row, the prompt once and its completions after it
    (`pack_shared_prompt`), so the prompt's forward and backward run once per
    group instead of once per completion. Same result, less compute.

    Returns logp [N, T], or (logp, entropy) with `return_entropy`: the entropy
    of each position's (temperature-scaled) next-token distribution.
    """
    if tokens.ndim != 2 or tokens.shape != input_mask.shape:
        raise ValueError(f"tokens {tokens.shape} and input_mask {input_mask.shape} must be the "
                         "same [N, L] shape")
    n, length = tokens.shape
    if not 1 <= prompt_len < length:
        raise ValueError(f"prompt_len={prompt_len} must be in [1, {length}): the sequence "
                         "needs at least one prompt token and one completion token")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if group < 1 or n % group:
        raise ValueError(f"group={group} must be positive and divide the {n} rows")
    steps = length - prompt_len
    if group > 1:
        if positions is not None:
            raise ValueError("positions cannot be given with group > 1: the packed rows "
                             "derive their own")
        hidden = gemma3.hidden_states(params, *pack_shared_prompt(
            tokens, input_mask, prompt_len, group), cfg, lora, (prompt_len, group))
        # Each completion's first token is predicted by the prompt's last position,
        # every later one by its own previous token.
        hidden = hidden[:, _predicting_index(prompt_len, steps, group)]
        hidden = hidden.reshape(n, steps, -1)
    else:
        if positions is None:
            positions = gemma3.left_padded_positions(input_mask)
        hidden = gemma3.hidden_states(params, tokens, positions, input_mask, cfg, lora)
        # Position p's hidden state predicts token p + 1.
        hidden = hidden[:, prompt_len - 1:length - 1]
    return projected_logprobs(params, hidden, tokens[:, prompt_len:], cfg, chunk_size,
                              temperature, return_entropy)


def packed_logprobs(params: gemma3.Params, lora, tokens: jax.Array, positions: jax.Array,
                    segments: jax.Array, index: jax.Array, targets: jax.Array,
                    cfg: ModelConfig, *, chunk_size: int = 256,
                    temperature: float = 1.0) -> jax.Array:
    """Log p(targets[r, k] | the tokens of its sequence up to position index[r, k])
    [R, K], float32, for rows [R, L] of several sequences packed end to end
    (`segments`: each token's sequence, PAD for padding; `positions` restart with
    each sequence). Only the K gathered positions reach the vocabulary projection,
    so prompt tokens cost no logits. Padded (index, target) slots get finite
    garbage: mask them downstream."""
    if tokens.shape != positions.shape or tokens.shape != segments.shape:
        raise ValueError(f"tokens {tokens.shape}, positions {positions.shape} and segments "
                         f"{segments.shape} must be the same [R, L] shape")
    if index.shape != targets.shape or index.shape[0] != tokens.shape[0]:
        raise ValueError(f"index {index.shape} and targets {targets.shape} must be [R, K] "
                         f"with the tokens' {tokens.shape[0]} rows")
    hidden = gemma3.hidden_states(params, tokens, positions, segments != 0, cfg, lora,
                                  segments=segments)
    hidden = jnp.take_along_axis(hidden, index[:, :, None], axis=1)
    return projected_logprobs(params, hidden, targets, cfg, chunk_size, temperature)


def projected_logprobs(params: gemma3.Params, hidden: jax.Array, targets: jax.Array,
                       cfg: ModelConfig, chunk_size: int, temperature: float,
                       return_entropy: bool = False):
    """log p(targets) [N, T] from the hidden states [N, T, D] that predict them, the
    vocabulary projection in chunks under jax.checkpoint (see per_token_logprobs)."""
    n, steps = targets.shape
    if vocab_parallel.tied_applies(cfg, return_entropy):
        logp = vocab_parallel.tied_logprobs(hidden.reshape(n * steps, -1), targets.reshape(-1),
                                            params["embed"], temperature, chunk_size)
        return logp.reshape(n, steps)
    # Chunks run over time, every row in each: the rows axis (sharded over data x fsdp
    # on a mesh) is never the looped one. ~chunk_size positions per chunk in all.
    span = max(1, min(steps, chunk_size // n))
    num_chunks = -(-steps // span)
    pad = num_chunks * span - steps
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    chunked_h = hidden.reshape(n, num_chunks, span, -1).swapaxes(0, 1)
    chunked_t = targets.reshape(n, num_chunks, span).swapaxes(0, 1)
    embed = params["embed"]

    @jax.checkpoint
    def one_chunk(args):
        h, t = args  # [n, span, D], [n, span]
        return vocab_parallel.logprobs(sharding.constrain(h), t, embed, cfg, temperature,
                                       return_entropy)

    logp, ent = jax.lax.map(one_chunk, (chunked_h, chunked_t))
    logp = logp.swapaxes(0, 1).reshape(n, -1)[:, :steps]
    if not return_entropy:
        return logp
    return logp, ent.swapaxes(0, 1).reshape(n, -1)[:, :steps]


def pack_shared_prompt(tokens: jax.Array, input_mask: jax.Array, prompt_len: int,
                       group: int):
    """Rows [N, P + T] in groups of `group` sharing their first P tokens ->
    (tokens, positions, input_mask), each [N / group, P + group * T]: the prompt
    once, then the group's completions, for `hidden_states(shared_prefix=(P, group))`.

    A completion's positions continue its prompt's, so every real token sees
    exactly what it saw unpacked. Only the first row of each group supplies the
    prompt.
    """
    n, length = tokens.shape
    steps, rows = length - prompt_len, n // group
    prompt_mask = input_mask[::group, :prompt_len]
    prompt_positions = gemma3.left_padded_positions(prompt_mask)
    completion_positions = (jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)[:, None]
                            + jnp.tile(jnp.arange(steps, dtype=jnp.int32), group)[None, :])

    def packed(x, prompt_part):
        return jnp.concatenate([prompt_part, x[:, prompt_len:].reshape(rows, group * steps)],
                               axis=1)

    return (packed(tokens, tokens[::group, :prompt_len]),
            jnp.concatenate([prompt_positions, completion_positions], axis=1),
            packed(input_mask, prompt_mask))


def _predicting_index(prompt_len: int, steps: int, group: int) -> np.ndarray:
    """[group * steps] indices into a packed row: the position whose hidden state
    predicts completion g's token t."""
    t = np.arange(steps)
    starts = prompt_len + steps * np.arange(group)[:, None]
    return np.where(t == 0, prompt_len - 1, starts + t - 1).reshape(-1)


# ---------------------------------------------------------------------------
# Loss


# How `policy_loss`'s metrics of parts of a batch combine into the whole batch's:
# means over valid tokens weight each part by its share of the tokens; extremes
# combine with their operation (from its identity); the rest are means over rows.
TOKEN_MEAN_METRICS = frozenset({"clip_frac_low", "clip_frac_high", "clip_frac", "ratio_mean",
                                "kl_mean", "entropy_mean", "nll"})
EXTREME_METRICS = {"ratio_min": (jnp.minimum, jnp.inf), "ratio_max": (jnp.maximum, -jnp.inf)}


def _masked_mean(x, mask):
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def aggregate(per_token: jax.Array, mask: jax.Array, aggregation: str) -> jax.Array:
    """Reduce a [N, T] per-token loss over the valid tokens to a scalar.

    seq-mean-token-mean: mean over rows of each row's token mean (GRPO);
    token-mean: one mean over all valid tokens (DAPO);
    seq-mean-token-sum-norm: sum over valid tokens / (N * T) (Dr. GRPO, a
    constant normaliser so long answers are not down-weighted).
    Empty rows (all-False mask) contribute 0 and never divide by zero; they
    still count in N.
    """
    masked = jnp.where(mask, per_token, 0.0)
    if aggregation == "seq-mean-token-mean":
        lengths = jnp.maximum(jnp.sum(mask, axis=1), 1)
        return jnp.mean(jnp.sum(masked, axis=1) / lengths)
    if aggregation == "token-mean":
        return jnp.sum(masked) / jnp.maximum(jnp.sum(mask), 1)
    if aggregation == "seq-mean-token-sum-norm":
        return jnp.sum(masked) / (per_token.shape[0] * per_token.shape[1])
    raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")


def policy_loss(logprobs: jax.Array, old_logprobs: jax.Array | None,
                ref_logprobs: jax.Array | None, advantages: jax.Array, mask: jax.Array, *,
                epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.04,
                kl_estimator: str = "k3", aggregation: str = "seq-mean-token-mean",
                ratio_level: str = "token", entropy: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped GRPO surrogate plus a beta-weighted KL term to the reference, and its metrics.

    logprobs, old_logprobs, ref_logprobs, mask, entropy: [N, T]; advantages [N].
    old_logprobs None means on-policy (old = stop_gradient(logprobs): ratio 1,
    gradient -A * grad logp). ref_logprobs may be None only when beta == 0.

    Per token: ratio r = exp(logp - old); loss = -min(r A, clip(r, 1-eps_low,
    1+eps_high) A) + beta * k, with d = ref - logp and k by `kl_estimator`:

    k3 (default, the GRPO paper's): k = exp(d) - d - 1. Its value is an unbiased,
      >= 0 estimate of KL(pi || ref); its on-policy expected gradient,
      E_pi[grad k] = -E_pi[(ref/pi) grad log pi], is grad KL(ref || pi), the reverse KL.
    k2: k = d^2 / 2. Its on-policy expected gradient, E_pi[(log pi - log ref)
      grad log pi], is grad KL(pi || ref). (Its value is a biased estimate.)
    k1: no loss term. k = logp - ref as a loss would have on-policy expected
      gradient E_pi[grad log pi] = 0: noise, no regularisation. k1 belongs in the
      reward instead: subtract `kl_reward_penalty` from each completion's reward
      before `group_advantages` (PPO-style RLHF).

    The `kl_mean` metric is always the k3 value (an unbiased, >= 0 estimate of
    KL(pi || ref)) whatever the estimator, so runs stay comparable; it is reported
    whenever ref_logprobs is given.

    ratio_level="sequence" is GSPO: s_i = exp(mean over valid t of (logp - old)),
    used at every token as s_i,t = sg[s_i] * exp(logp_t - sg[logp_t]). Its value is
    s_i and its gradient s_i * grad logp_t, so with the token mean of
    seq-mean-token-mean it reproduces GSPO's s_i * A_i * mean_t grad logp_t.

    String options are Python-level: jit with them static.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; choose one of {KL_ESTIMATORS}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; choose one of {RATIO_LEVELS}")
    if logprobs.ndim != 2:
        raise ValueError(f"logprobs must be [N, T], got shape {logprobs.shape}")
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                    ("mask", mask), ("entropy", entropy)):
        if x is not None and x.shape != logprobs.shape:
            raise ValueError(f"{name} shape {x.shape} does not match logprobs {logprobs.shape}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages shape {advantages.shape} must be [N]={logprobs.shape[:1]}")
    # Numbers may be traced (a schedule under jit): check them only when concrete.
    eps_lo, eps_hi, beta_v = (_concrete_float(x) for x in (epsilon_low, epsilon_high, beta))
    if (eps_lo is not None and not eps_lo >= 0) or (eps_hi is not None and not eps_hi >= 0):
        raise ValueError(f"epsilon_low/high must be >= 0, got {epsilon_low}, {epsilon_high}")
    if beta_v is not None and not beta_v >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    use_kl = beta_v is None or beta_v > 0
    if use_kl and ref_logprobs is None:
        raise ValueError("beta > 0 (or traced) needs ref_logprobs (the base model with LoRA off)")

    mask = mask.astype(bool)
    # Zero padded entries before any exp: garbage there would give inf * 0 = NaN in
    # the loss or, through jnp.where, in the gradient.
    logp = jnp.where(mask, logprobs, 0.0)
    if old_logprobs is None:
        old = jax.lax.stop_gradient(logp)
    else:
        old = jnp.where(mask, old_logprobs, 0.0)
    adv = advantages.astype(logp.dtype)[:, None]

    if ratio_level == "token":
        log_ratio = logp - old
    else:
        lengths = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1)
        seq_log_ratio = jnp.sum(logp - old, axis=1, keepdims=True) / lengths
        log_ratio = jax.lax.stop_gradient(seq_log_ratio) + logp - jax.lax.stop_gradient(logp)
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)

    kl = None
    if ref_logprobs is not None:
        delta = jnp.where(mask, ref_logprobs, 0.0) - logp
        kl = jnp.exp(delta) - delta - 1.0  # k3: the reported value whatever the estimator
        if use_kl and kl_estimator == "k3":
            per_token = per_token + beta * kl
        elif use_kl and kl_estimator == "k2":
            per_token = per_token + beta * 0.5 * delta * delta
        # k1: nothing here; it is a penalty on the reward (`kl_reward_penalty`).
    loss = aggregate(per_token, mask, aggregation)

    sg = jax.lax.stop_gradient
    r = sg(ratio)
    low = (r < 1.0 - epsilon_low) & (adv < 0) & mask
    high = (r > 1.0 + epsilon_high) & (adv > 0) & mask
    any_valid = jnp.any(mask)
    metrics = {
        "clip_frac_low": _masked_mean(low, mask),
        "clip_frac_high": _masked_mean(high, mask),
        "clip_frac": _masked_mean(low | high, mask),
        "ratio_mean": _masked_mean(r, mask),
        "ratio_min": jnp.where(any_valid, jnp.min(jnp.where(mask, r, jnp.inf)), 1.0),
        "ratio_max": jnp.where(any_valid, jnp.max(jnp.where(mask, r, -jnp.inf)), 1.0),
        "advantage_mean": jnp.mean(sg(adv)),
        "completion_len_mean": jnp.mean(jnp.sum(mask, axis=1).astype(jnp.float32)),
    }
    if kl is not None:
        metrics["kl_mean"] = _masked_mean(sg(kl), mask)
    if entropy is not None:
        metrics["entropy_mean"] = _masked_mean(sg(entropy), mask)
    return loss, metrics


def kl_reward_penalty(sample_logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array,
                      beta) -> jax.Array:
    """k1 as a penalty on the reward: beta * sum over valid t of (logp_t - ref_t), [N].

    sample_logprobs, ref_logprobs, mask: [N, T]. sample_logprobs: the log-probs of
    the sampled tokens under the distribution they were drawn from (the sampler's
    `sampling_logprobs`, at the temperature ref_logprobs use). Without top-k/top-p
    they equal the trainer's log-probs to float rounding (the `logprob_drift`
    metric); with truncation they are the truncated policy's, the one that sampled.
    Subtract the result from each completion's total reward before
    `group_advantages` (PPO-style RLHF "KL in the reward"), with
    kl_estimator="k1" so `policy_loss` adds no KL term of its own.

    Why it is correct there: as a reward it is multiplied by grad log pi(y) under
    REINFORCE, and E_pi[grad log pi(y) * (-beta log(pi(y) / ref(y)))]
    = -beta grad KL(pi || ref), so ascending the reward descends KL(pi || ref).
    (As a loss term, E_pi[grad (log pi - log ref)] = E_pi[grad log pi] = 0.)
    The penalty carries no gradient (stop_gradient): it enters only through the
    advantages. Padded entries may hold garbage; they are ignored. jit-friendly
    (beta may be traced).
    """
    if sample_logprobs.ndim != 2:
        raise ValueError(f"sample_logprobs must be [N, T], got shape {sample_logprobs.shape}")
    for name, x in (("ref_logprobs", ref_logprobs), ("mask", mask)):
        if x.shape != sample_logprobs.shape:
            raise ValueError(f"{name} shape {x.shape} does not match sample_logprobs "
                             f"{sample_logprobs.shape}")
    beta_v = _concrete_float(beta)
    if beta_v is not None and not beta_v >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    mask = mask.astype(bool)
    log_ratio = jnp.where(mask, sample_logprobs - ref_logprobs, 0.0)
    return jax.lax.stop_gradient(beta * jnp.sum(log_ratio, axis=1))


def masked_nll(logprobs: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Supervised loss on completion tokens only: the mean over the valid tokens of
    -log p(token) (prompt and padding are masked out by `mask`), and its metrics.

    logprobs, mask: [N, T]. A token mean (not a mean of row means), so every target
    token counts the same whatever the length of its row; micro-batches add up to
    the whole batch when weighted by their share of the tokens.
    """
    if logprobs.ndim != 2 or mask.shape != logprobs.shape:
        raise ValueError(f"logprobs {logprobs.shape} and mask {mask.shape} must be the same "
                         "[N, T] shape")
    mask = mask.astype(bool)
    nll = jnp.sum(jnp.where(mask, -logprobs, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
    return nll, {"nll": jax.lax.stop_gradient(nll)}
