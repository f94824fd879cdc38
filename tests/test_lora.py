"""LoRA: zero-init equals the base, merged equals unmerged, targets by name, gradients
and AdamW state for the adapters only, and the 270M rank-16 memory figure."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from grpo_jax import grpo
from grpo_jax.model.config import GEMMA3_270M, LoraConfig, TINY
from grpo_jax.model import gemma3, lora as lora_lib

from _tiny_model import random_lora, random_params

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPT_LEN = 5
# One adapter shape for every test, so the jitted functions compile once.
LORA_CFG = LoraConfig(rank=4, alpha=8.0)

_forward = jax.jit(gemma3.forward, static_argnums=4)


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng()
    return random_params(TINY, rng), rng


def _batch(rng, n=4, steps=6):
    length = PROMPT_LEN + steps
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (n, length)), jnp.int32)
    p_lens = rng.integers(1, PROMPT_LEN + 1, n)
    c_lens = rng.integers(1, steps + 1, n)
    idx = np.arange(length)[None]
    mask = (idx >= PROMPT_LEN - p_lens[:, None]) & (idx < PROMPT_LEN + c_lens[:, None])
    return tokens, jnp.asarray(mask)


def _logits(params, lw, tokens, mask):
    return np.asarray(_forward(params, tokens, gemma3.left_padded_positions(mask), mask, TINY, lw))


def test_zero_init_equals_base(model):
    params, rng = model
    lw = lora_lib.init_lora(TINY, LORA_CFG, jax.random.key(int(rng.integers(2 ** 31))))
    a = [x for path, x in jax.tree_util.tree_leaves_with_path(lw) if path[-1].key == "a"]
    b = [x for path, x in jax.tree_util.tree_leaves_with_path(lw) if path[-1].key == "b"]
    assert len(a) == len(b) == TINY.num_layers * 7
    assert all(np.all(np.asarray(x) == 0) for x in b)
    assert all(np.std(np.asarray(x)) > 0 for x in a)
    tokens, mask = _batch(rng)
    m = np.asarray(mask)
    base = _logits(params, None, tokens, mask)[m]
    # B = 0 adds exact zeros, but the two programs may fuse their dots differently:
    # equal to a few float32 ulps of the largest logit, not bit for bit.
    np.testing.assert_allclose(_logits(params, lw, tokens, mask)[m], base, rtol=0,
                               atol=1e-6 * np.abs(base).max())


def test_merge_equals_unmerged(model):
    params, rng = model
    lcfg = LORA_CFG
    assert set(lcfg.targets) == {"q", "kv", "o", "gate", "up", "down"}
    lw = random_lora(TINY, lcfg, rng, b_std=0.1)
    merged = lora_lib.merge(params, lw)
    # The folded weight, restated in float64: w + (alpha / rank) * a @ b in w's layout.
    for layer in (0, TINY.num_layers - 1):
        for block, name in lcfg.projections:
            ad = lw.layers[layer][block][name]
            a, b = np.asarray(ad["a"], np.float64), np.asarray(ad["b"], np.float64)
            want = (np.asarray(params["layers"][layer][block][name], np.float64)
                    + lcfg.alpha / lcfg.rank * np.tensordot(a, b, axes=([a.ndim - 1], [0])))
            np.testing.assert_allclose(np.asarray(merged["layers"][layer][block][name]), want,
                                       rtol=1e-5, atol=1e-6, err_msg=f"{layer}.{block}.{name}")
    tokens, mask = _batch(rng)
    m = np.asarray(mask)
    unmerged = _logits(params, lw, tokens, mask)
    base = _logits(params, None, tokens, mask)
    assert np.max(np.abs(unmerged - base)[m]) > 1e-2, "adapters should change the output"
    np.testing.assert_allclose(_logits(merged, None, tokens, mask)[m], unmerged[m],
                               rtol=1e-4, atol=1e-4)


def test_targets_rank_and_scale():
    lcfg = LoraConfig(rank=3, alpha=6.0, targets=("q", "o", "down"))
    assert lcfg.scale == 2.0
    # Shapes only (eval_shape): test_zero_init_equals_base covers the values.
    lw = jax.eval_shape(lambda k: lora_lib.init_lora(TINY, lcfg, k), jax.random.key(0))
    assert lw.scale == 2.0
    d, h, dh, f = TINY.embed_dim, TINY.num_heads, TINY.head_dim, TINY.ffw_dim
    for layer in lw.layers:
        assert {b: set(v) for b, v in layer.items()} == {"attn": {"q", "o"}, "mlp": {"down"}}
        shapes = {(blk, name, ab): layer[blk][name][ab].shape
                  for blk, name in (("attn", "q"), ("attn", "o"), ("mlp", "down")) for ab in "ab"}
        assert shapes == {("attn", "q", "a"): (d, 3), ("attn", "q", "b"): (3, h, dh),
                          ("attn", "o", "a"): (h, dh, 3), ("attn", "o", "b"): (3, d),
                          ("mlp", "down", "a"): (f, 3), ("mlp", "down", "b"): (3, d)}
    kv = lora_lib.abstract_lora(TINY, LoraConfig(rank=2, targets=("kv",)))
    assert set(kv.layers[0]["attn"]) == {"k", "v"} and "mlp" not in kv.layers[0]
    with pytest.raises(ValueError, match="LoRA targets"):
        LoraConfig(targets=("qkv",))
    with pytest.raises(ValueError, match="rank must be positive"):
        LoraConfig(rank=0)


def _grpo_loss(lw, params, tokens, input_mask, advantages, beta):
    """The training loss: policy = base + LoRA, reference = the same base, LoRA off."""
    cmask = input_mask[:, PROMPT_LEN:]
    logp = grpo.per_token_logprobs(params, lw, tokens, input_mask, PROMPT_LEN, TINY, chunk_size=7)
    ref = grpo.per_token_logprobs(params, None, tokens, input_mask, PROMPT_LEN, TINY, chunk_size=7)
    return grpo.policy_loss(logp, None, jax.lax.stop_gradient(ref), advantages, cmask,
                            beta=beta)[0]


_loss_grad = jax.jit(jax.value_and_grad(_grpo_loss))


def test_only_lora_receives_gradients_and_optimizer_state(model):
    params, rng = model
    lw = random_lora(TINY, LORA_CFG, rng, b_std=0.0)  # as init_lora: A random, B zero
    tokens, mask = _batch(rng)
    adv = jnp.asarray(rng.standard_normal(tokens.shape[0]), jnp.float32)

    _, grads = _loss_grad(lw, params, tokens, mask, adv, 0.04)
    # The gradient is a LoraWeights: the adapters' tree and nothing else.
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, lw)
    chex.assert_tree_all_finite(grads)
    # At B = 0 only B is pushed (d/dA goes through B), and every B is.
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        if path[-1].key == "a":
            assert np.all(np.asarray(g) == 0)
        else:
            assert np.any(np.asarray(g) != 0), jax.tree_util.keystr(path)

    opt = optax.adamw(1e-2)
    state = opt.init(lw)
    state_leaves = jax.tree.leaves(state)
    big = [x for x in state_leaves if x.ndim > 0]
    # mu and nu, one of each per adapter leaf; the rest are scalar step counts.
    assert sorted(x.shape for x in big) == sorted(2 * [x.shape for x in jax.tree.leaves(lw)])
    assert sum(x.size for x in state_leaves) == 2 * lora_lib.num_params(lw) + \
        len(state_leaves) - len(big)

    m = np.asarray(mask)
    base_before = _logits(params, None, tokens, mask)
    @jax.jit
    def step(grads, state, lw):
        updates, state = opt.update(grads, state, lw)
        return optax.apply_updates(lw, updates), state

    lw2, state = step(grads, state, lw)
    assert jax.tree.structure(lw2) == jax.tree.structure(lw) and lw2.scale == lw.scale
    # The step moved the policy; the reference (same base weights, LoRA off) is untouched.
    base_after = _logits(params, None, tokens, mask)
    assert np.max(np.abs(_logits(params, lw2, tokens, mask) - base_after)[m]) > 1e-4
    np.testing.assert_array_equal(base_after, base_before)


def test_model_gradient_is_advantage_weighted_logprob_gradient(model):
    """On-policy with beta = 0, through the model: the gradient of the GRPO loss w.r.t.
    LoRA equals that of -sum_i A_i / (N |o_i|) sum_t logp[i, t] (seq-mean-token-mean)."""
    params, rng = model
    lw = random_lora(TINY, LORA_CFG, rng)
    tokens, mask = _batch(rng)
    n = tokens.shape[0]
    adv = jnp.asarray(rng.standard_normal(n), jnp.float32)
    cmask = mask[:, PROMPT_LEN:]
    weights = adv[:, None] * cmask / jnp.maximum(cmask.sum(1, keepdims=True), 1) / n

    def surrogate(lw):
        logp = grpo.per_token_logprobs(params, lw, tokens, mask, PROMPT_LEN, TINY, chunk_size=7)
        return -jnp.sum(weights * logp)

    _, got = _loss_grad(lw, params, tokens, mask, adv, 0.0)
    want = jax.jit(jax.grad(surrogate))(lw)
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(want))
    chex.assert_trees_all_equal_structs(got, want)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5 * scale)


def _independent_lora_count(cfg, rank: int) -> int:
    """r * (fan_in + fan_out) per adapted projection, from the architecture numbers."""
    d, qd, kvd, f = cfg.embed_dim, cfg.num_heads * cfg.head_dim, \
        cfg.num_kv_heads * cfg.head_dim, cfg.ffw_dim
    per_layer = ((d + qd) + 2 * (d + kvd) + (qd + d)   # q, k, v, o
                 + 2 * (d + f) + (f + d))               # gate, up, down
    return rank * per_layer * cfg.num_layers


def test_lora_memory_script_270m_rank16():
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lora_memory.py"),
                          "--model", "gemma3-270m", "--rank", "16"],
                         capture_output=True, text=True, check=True, env=env, timeout=600)
    rep = json.loads(out.stdout)
    n = _independent_lora_count(GEMMA3_270M, 16)
    assert n == 3_796_992
    assert rep["lora_params"] == n
    assert rep["lora_bytes"] == rep["grad_bytes"] == 4 * n
    # AdamW: first and second moments (float32, like the adapters) plus a step counter.
    assert 8 * n <= rep["adamw_state_bytes"] <= 8 * n + 64
    assert rep["lora_plus_adamw_bytes"] == rep["lora_bytes"] + rep["adamw_state_bytes"]
    assert abs(rep["lora_plus_adamw_mib"] - 12 * n / 2 ** 20) < 1e-3
    assert rep["base_params"] == sum(x.size for x in jax.tree.leaves(
        gemma3.abstract_params(GEMMA3_270M)))


def test_adapter_logical_axes_follow_the_base_weight():
    """a keeps the base weight's input axes, b its output axes, with lora_rank between."""
    axes = lora_lib.lora_logical_axes(GEMMA3_270M, LoraConfig(rank=16))
    assert len(axes) == GEMMA3_270M.num_layers
    layer = axes[0]
    assert layer["attn"]["q"] == {"a": ("embed", "lora_rank"),
                                  "b": ("lora_rank", "q_heads", "head_dim")}
    assert layer["attn"]["k"]["b"] == ("lora_rank", "kv_heads", "head_dim")
    assert layer["attn"]["o"] == {"a": ("q_heads", "head_dim", "lora_rank"),
                                  "b": ("lora_rank", "embed")}
    assert layer["mlp"]["down"] == {"a": ("ffw", "lora_rank"), "b": ("lora_rank", "embed")}
    shapes = jax.tree.map(lambda x: x.shape, lora_lib.init_lora(
        TINY, LoraConfig(rank=3), jax.random.key(0)).layers)
    tiny_axes = lora_lib.lora_logical_axes(TINY, LoraConfig(rank=3))
    for shape, names in zip(jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)),
                            jax.tree.leaves(tiny_axes, is_leaf=lambda x: isinstance(x, tuple))):
        assert len(shape) == len(names)
