"""The supervised (SFT) objective of `update.build_update`: the masked NLL of completion
tokens against a float64 NumPy restatement from the full logits, micro-batches that
add up to the whole batch, and updates that lower it."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import grpo, runs, update as step_lib
from grpo_jax.config import OptimizerConfig
from grpo_jax.presets import TRAIN_PRESETS
from grpo_jax.model import gemma3, lora as lora_lib

TINY = TRAIN_PRESETS["tiny"]


def _batch(rng, n=8, prompt_len=7, t=5):
    """n different problems (n a multiple of the group size, where GRPO would pack
    rows sharing a prompt: SFT must not): left-padded prompts of 1..prompt_len tokens, targets of
    1..t tokens (right-padded), as update.teacher_forced_batch builds them."""
    p_lens, c_lens = rng.integers(1, prompt_len + 1, n), rng.integers(1, t + 1, n)
    prompts = rng.integers(3, 250, (n, prompt_len))
    prompt_mask = np.arange(prompt_len)[None, :] >= prompt_len - p_lens[:, None]
    targets = np.where(np.arange(t)[None, :] < c_lens[:, None], rng.integers(3, 250, (n, t)), 0)
    return step_lib.teacher_forced_batch(prompts, prompt_mask, targets, c_lens, group=1)


def _numpy_nll(params, lora, batch, model_cfg) -> float:
    """-mean over target tokens of log_softmax(full logits) in float64, one row at a time."""
    total, count = 0.0, 0
    p = batch.prompt_len
    for tokens, mask in zip(np.asarray(batch.tokens), np.asarray(batch.input_mask)):
        real = tokens[mask][None, :]
        positions = np.arange(real.shape[1])[None, :]
        logits = np.asarray(gemma3.forward(params, jnp.asarray(real), jnp.asarray(positions),
                                           jnp.ones(real.shape, bool), model_cfg, lora),
                            np.float64)[0]
        logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
        n_prompt = int(mask[:p].sum())
        n_target = int(mask[p:].sum())
        for i in range(n_target):  # target i is predicted at position n_prompt - 1 + i
            pos = n_prompt - 1 + i
            total -= logits[pos, real[0, pos + 1]] - logz[pos]
            count += 1
    return total / count


@pytest.fixture(scope="module")
def model():
    base = runs.load_run_base(TINY)
    lora = lora_lib.init_lora(base.cfg, TINY.lora, jax.random.key(1))
    # Non-zero adapters, so the LoRA path is part of what is compared.
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), lora)
    return base, lora


def _fns(base, micro_batch=0, lr=1e-4, updates=10):
    grpo_cfg = dataclasses.replace(TINY.grpo, micro_batch=micro_batch, logprob_chunk=8)
    opt = OptimizerConfig(learning_rate=lr, warmup_ratio=0.0, weight_decay=0.0)
    return step_lib.build_update(base.cfg, grpo_cfg, opt, updates, 1.0, step_lib.NLLLoss())


def test_sft_loss_is_the_masked_nll_of_the_targets(model):
    base, lora = model
    seed = np.random.SeedSequence().entropy
    batch = _batch(np.random.default_rng(seed))
    fns = _fns(base)
    _, metrics = fns.update(base.params, fns.init_state(jax.tree.map(jnp.copy, lora)), batch)
    want = _numpy_nll(base.params, lora, batch, base.cfg)
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=2e-5, err_msg=f"seed {seed}")
    np.testing.assert_allclose(float(metrics["nll"]), want, rtol=2e-5, err_msg=f"seed {seed}")
    # grpo.masked_nll is a token mean: padding never counts, an empty row adds nothing.
    logp = jnp.asarray([[-1.0, -3.0, 7.0], [-2.0, 9.0, 9.0], [5.0, 5.0, 5.0]])
    mask = jnp.asarray([[True, True, False], [True, False, False], [False, False, False]])
    assert float(grpo.masked_nll(logp, mask)[0]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="same"):
        grpo.masked_nll(logp, mask[:, :2])
    with pytest.raises(ValueError, match="objective must be a loss object"):
        step_lib.build_update(base.cfg, TINY.grpo, TINY.optimizer, 4, 1.0, objective="dpo")


def test_sft_micro_batches_add_up_to_the_whole_batch(model):
    base, lora = model
    batch = _batch(np.random.default_rng(7))
    whole_fns, micro_fns = _fns(base), _fns(base, micro_batch=2)
    whole = whole_fns.update(base.params, whole_fns.init_state(jax.tree.map(jnp.copy, lora)),
                             batch)
    micro = micro_fns.update(base.params, micro_fns.init_state(jax.tree.map(jnp.copy, lora)),
                             batch)
    np.testing.assert_allclose(float(micro[1]["loss"]), float(whole[1]["loss"]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 micro[0].lora, whole[0].lora)


def test_sft_updates_lower_the_nll(model):
    base, lora = model
    batch = _batch(np.random.default_rng(11))
    fns = _fns(base, lr=1e-2, updates=30)
    state = fns.init_state(jax.tree.map(jnp.copy, lora))
    losses = []
    for _ in range(30):
        state, metrics = fns.update(base.params, state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
