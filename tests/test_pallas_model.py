"""The model with `attention_impl="pallas"` (kernels in TPU interpret mode) against the
XLA path on the tiny config: log-probs and their gradients (plain and packed shared
prompts), the training step's loss and gradient norm, and the sampler's tokens."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _tiny_model import random_lora, random_params
from grpo_jax import grpo, update as step_lib
from grpo_jax.config import GRPOConfig, OptimizerConfig, SamplerConfig
from grpo_jax.model.config import LoraConfig, TINY
from grpo_jax.sampler import left_pad, sample
from test_grpo import make_groups
from test_kernels import rel_err

# Two layers, a sliding-window one then a global one: each attention kind the kernels
# serve, in 45 s where TINY's four layers took 74 (interpret mode, one process, D).
CFG = dataclasses.replace(TINY, num_layers=2)
assert [CFG.is_global_layer(i) for i in range(CFG.num_layers)] == [False, True]
PALLAS = dataclasses.replace(CFG, attention_impl="pallas")


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng()
    return random_params(CFG, rng), random_lora(CFG, LoraConfig(rank=4, alpha=8.0), rng)


@pytest.mark.parametrize("group", [1, 4], ids=["plain", "packed"])
def test_logprobs_and_gradients_equal_xla(model, group):
    params, lora = model
    rng = np.random.default_rng()
    prompt_len = 6
    tokens, input_mask, cmask = make_groups(rng, CFG, group=4, prompt_len=prompt_len)
    weights = jnp.asarray(rng.standard_normal(cmask.shape), jnp.float32) * cmask

    def objective(lora, cfg):
        logp = grpo.per_token_logprobs(params, lora, tokens, input_mask, prompt_len, cfg,
                                       chunk_size=8, group=group)
        return jnp.sum(weights * logp), logp

    grad = jax.jit(jax.grad(objective, has_aux=True), static_argnums=1)
    (g_xla, logp_xla), (g_pallas, logp_pallas) = grad(lora, CFG), grad(lora, PALLAS)
    m = np.asarray(cmask)
    assert rel_err(np.asarray(logp_pallas)[m], np.asarray(logp_xla)[m]) <= 1e-5
    for path, got in jax.tree_util.tree_leaves_with_path(g_pallas):
        want = g_xla
        for key in path:
            want = want[key.key] if hasattr(key, "key") else (
                want[key.idx] if hasattr(key, "idx") else getattr(want, key.name))
        assert rel_err(got, want) <= 1e-5, jax.tree_util.keystr(path)


def test_training_step_equals_xla(model):
    params, lora = model
    seed = int(np.random.default_rng().integers(1 << 30))
    rng = np.random.default_rng(seed)
    prompt_len, group = 6, 4
    tokens, input_mask, cmask = make_groups(rng, CFG, group=group, prompt_len=prompt_len)
    n, steps = cmask.shape
    grpo_cfg = GRPOConfig(num_prompts=n // group, group_size=group, beta=0.04)
    xla_fns = step_lib.build_update(CFG, grpo_cfg, OptimizerConfig(), total_updates=4)
    logp = xla_fns.logprobs(params, lora, tokens, input_mask, prompt_len)
    # Old log-probs a little off the policy, so the ratio and clipping take part.
    batch = step_lib.Batch(
        tokens=tokens, input_mask=input_mask, prompt_len=prompt_len,
        old_logprobs=logp + jnp.asarray(0.1 * rng.standard_normal((n, steps)), jnp.float32),
        ref_logprobs=xla_fns.logprobs(params, None, tokens, input_mask, prompt_len),
        advantages=jnp.asarray(rng.standard_normal(n), jnp.float32))
    results = []
    for cfg in (CFG, PALLAS):
        fns = step_lib.build_update(cfg, grpo_cfg, OptimizerConfig(), total_updates=4)
        state = fns.init_state(jax.tree.map(jnp.copy, lora))  # the update donates it
        _, metrics = fns.update(params, state, batch)
        results.append({k: float(v) for k, v in metrics.items()})
    xla, pallas = results
    for name in ("loss", "grad_norm"):
        assert np.isfinite(xla[name]) and xla[name] != 0, name
    # The loss is a mean of O(1) terms (standard-normal advantages times ratios near 1)
    # of either sign: summed in another order it differs by ulps of those terms, not of
    # the mean they cancel down to (CI saw 1.8e-5 relative to a loss of 0.21). The
    # gradient norm sums squares, so nothing cancels there.
    assert abs(pallas["loss"] - xla["loss"]) <= 1e-5 * max(abs(xla["loss"]), 1.0), seed
    assert abs(pallas["grad_norm"] - xla["grad_norm"]) <= 1e-5 * xla["grad_norm"], seed


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampler_equals_xla(model, temperature):
    """Prompts of 3..13 tokens, 10 new: rows cross the tiny 4-token window's ring
    buffer many times; same key, same tokens."""
    params, _ = model
    rng = np.random.default_rng()
    prompts = [[2] + rng.integers(3, CFG.vocab_size, size=n - 1).tolist() for n in (3, 13, 7)]
    tokens, mask = left_pad(prompts, multiple=8)
    sampling = SamplerConfig(max_new_tokens=10, temperature=temperature, stop_ids=(),
                             prompt_bucket=8)
    flat = {**params, "embed": params["embed"] * 0.05}  # flat logits: real choices
    key = jax.random.key(int(rng.integers(1 << 30)))
    outs = [sample(flat, jnp.asarray(tokens), jnp.asarray(mask), key, cfg=cfg,
                   sampling=sampling, group=2) for cfg in (CFG, PALLAS)]
    np.testing.assert_array_equal(outs[1].tokens, outs[0].tokens)
    np.testing.assert_allclose(outs[1].logprobs, outs[0].logprobs, atol=2e-5)


def test_bad_attention_settings_are_clear_errors():
    from grpo_jax.config import TrainConfig
    from grpo_jax.model import attention

    with pytest.raises(ValueError, match="attention implementation 'flash'"):
        dataclasses.replace(CFG, attention_impl="flash")
    with pytest.raises(ValueError, match="choose one of xla, pallas"):
        TrainConfig(attention="splash")
    keys, values = jnp.zeros((1, 1, 8, 6)), jnp.zeros((1, 1, 6, 8))
    with pytest.raises(ValueError, match="longer than its window 4"):
        attention.cached_attention(jnp.zeros((1, 2, 8)), keys, values, jnp.zeros((1,), jnp.int32),
                                   PALLAS, scale=1.0, window=4)
