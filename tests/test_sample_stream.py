"""Continuous batching (`sampler.sample_stream`) against one batch of every prompt
(`sampler.sample_prompts`): the same tokens, log-probs, lengths and stop flags, greedy
and sampled, with stop tokens and stop strings, through a sliding-window ring buffer,
with fewer decode steps; and bad input."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from grpo_jax import sampler, stop_strings
from grpo_jax.config import SamplerConfig
from grpo_jax.model.config import TINY
from grpo_jax.model import gemma3
from grpo_jax.tokenizer import ByteTokenizer

BUDGET = 24


def _params(seed: int = 3, flatten: float = 0.05):
    params = gemma3.init_params(TINY, jax.random.key(seed))
    # Flat logits: sampled rows differ and stop at different lengths.
    return {**params, "embed": params["embed"] * flatten}


def _prompts(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    # 2..13 tokens: some shorter than TINY's window of 4, some much longer.
    return [[2] + rng.integers(3, TINY.vocab_size, size=int(k)).tolist()
            for k in rng.integers(1, 13, size=n)]


def _assert_same(a: sampler.SampleOutput, b: sampler.SampleOutput):
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.stopped, b.stopped)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.sampling_logprobs, b.sampling_logprobs, rtol=1e-5, atol=1e-5)


def _stop_ids_some_rows_hit(params, prompts, sampling):
    """Two token ids that some, not all, rows of the one-batch run write: so rows
    stop at different steps and slots free up at different times."""
    free = sampler.sample_prompts(params, prompts, jax.random.key(7), cfg=TINY, sampling=sampling)
    firsts = {}
    for row in free.tokens:
        for t in row[2:6].tolist():
            firsts[t] = firsts.get(t, 0) + 1
    picks = [t for t, c in sorted(firsts.items(), key=lambda kv: kv[1]) if t > 2][:2]
    return tuple(picks)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stream_equals_one_batch_of_every_prompt(temperature):
    params = _params()
    prompts = _prompts(11)
    sampling = SamplerConfig(max_new_tokens=BUDGET, temperature=temperature, stop_ids=(),
                             prompt_bucket=8)
    stops = _stop_ids_some_rows_hit(params, prompts, sampling)
    sampling = SamplerConfig(max_new_tokens=BUDGET, temperature=temperature, stop_ids=stops,
                             prompt_bucket=8)
    key = jax.random.key(7)
    # All 11 prompts in one batch of 16 rows: row r draws with fold_in(key, r).
    whole = sampler.sample_prompts(params, prompts, key, cfg=TINY, sampling=sampling)
    assert 0 < whole.stopped.sum() < len(prompts), "the stop ids should stop some rows only"
    streamed = sampler.sample_stream(params, prompts, key, cfg=TINY, sampling=sampling,
                                    slots=4, refill=2)
    _assert_same(streamed, whole)
    # 11 prompts through 4 slots: at least ceil(11 / 4) budgets' worth of steps in
    # batches of 4; the stream runs fewer, because stopped rows hand their slot on.
    assert int(streamed.steps) < 3 * BUDGET


def test_stream_with_stop_strings_and_lora_equals_one_batch():
    from tests._tiny_model import random_lora
    from grpo_jax.model.config import LoraConfig

    tok = ByteTokenizer()
    params = _params(flatten=0.05)
    lora = random_lora(TINY, LoraConfig(rank=4, alpha=8.0), np.random.default_rng(1))
    strings = ("e", "a", "\x10")  # common single bytes: some rows write one, some not
    sampling = SamplerConfig(max_new_tokens=BUDGET, temperature=1.0, stop_ids=(),
                             prompt_bucket=8, stop_strings=strings)
    table = stop_strings.stop_table(tok, strings, TINY.vocab_size)
    prompts = _prompts(9, seed=1)
    key = jax.random.key(5)
    whole = sampler.sample_prompts(params, prompts, key, cfg=TINY, sampling=sampling, lora=lora,
                                   stop_table=table)
    assert 0 < whole.stopped.sum() < len(prompts)
    streamed = sampler.sample_stream(params, prompts, key, cfg=TINY, sampling=sampling, slots=3,
                                    refill=1, lora=lora, stop_table=table)
    _assert_same(streamed, whole)


def test_stream_of_fewer_prompts_than_slots_and_a_refill_larger_than_what_is_left():
    params = _params(flatten=1.0)
    prompts = _prompts(5, seed=2)
    sampling = SamplerConfig(max_new_tokens=8, temperature=0.0, stop_ids=(), prompt_bucket=8)
    key = jax.random.key(0)
    whole = sampler.sample_prompts(params, prompts, key, cfg=TINY, sampling=sampling)
    for slots, refill in ((64, None), (4, 3)):
        out = sampler.sample_stream(params, prompts, key, cfg=TINY, sampling=sampling,
                                   slots=slots, refill=refill)
        _assert_same(out, whole)
        assert (out.lengths == 8).all() and not out.stopped.any()


def test_stream_rejects_bad_input():
    params = _params()
    sampling = SamplerConfig(max_new_tokens=4, temperature=0.0, stop_ids=(), prompt_bucket=8)
    with pytest.raises(ValueError, match="no prompts"):
        sampler.sample_stream(params, [], jax.random.key(0), cfg=TINY, sampling=sampling)
    with pytest.raises(ValueError, match="must be positive"):
        sampler.sample_stream(params, [[2, 5]], jax.random.key(0), cfg=TINY, sampling=sampling,
                             slots=0)
    with pytest.raises(ValueError, match="stop_table"):
        sampler.sample_stream(params, [[2, 5]], jax.random.key(0), cfg=TINY,
                             sampling=SamplerConfig(max_new_tokens=4, stop_strings=("a",)))
    with pytest.raises(ValueError, match="empty prompt"):
        sampler.sample_stream(params, [[2, 5], []], jax.random.key(0), cfg=TINY,
                             sampling=sampling)
