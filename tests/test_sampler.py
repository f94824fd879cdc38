"""KV-cached sampler: against the full uncached forward token for token, across a
sliding-window boundary; padding and batch invariance; group fan-out; stop tokens;
the sampling distributions themselves; bad input."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import decode, sampler, sampling as sampling_lib, sharding
from grpo_jax.config import SamplerConfig
from grpo_jax.model.config import TINY
from grpo_jax.model import gemma3, kv_cache
from grpo_jax.sampler import left_pad, sample, sample_prompts
from grpo_jax.kernels import reference
from tests.uncached_sampler import sample_uncached

NO_STOP = ()
GREEDY = SamplerConfig(max_new_tokens=12, temperature=0.0, stop_ids=NO_STOP, prompt_bucket=8)


def _fresh_seed() -> int:
    return int(np.random.default_rng().integers(1 << 30))


def _tiny_params(seed: int, flatten: float = 1.0):
    params = gemma3.init_params(TINY, jax.random.key(seed))
    # A small embedding flattens the (tied) logits so sampling has real choices to make.
    return {**params, "embed": params["embed"] * flatten}


_forward = jax.jit(gemma3.forward, static_argnums=4)


def _full_logprobs(params, ids, width=32):
    """The full forward's log-probs of `ids`, right-padded to a multiple of `width` (no
    real token attends to a later one, so the padding changes nothing): one compile for
    every length up to it, where each length compiled its own before."""
    n = len(ids)
    padded = -(-n // width) * width
    tokens = jnp.asarray([list(ids) + [0] * (padded - n)], jnp.int32)
    mask = jnp.asarray([[True] * n + [False] * (padded - n)])
    logits = _forward(params, tokens, gemma3.left_padded_positions(mask), mask, TINY)
    return np.asarray(jax.nn.log_softmax(logits[0, :n], axis=-1))


def _prompts(rng, lengths):
    return [[2] + rng.integers(3, TINY.vocab_size, size=n - 1).tolist() for n in lengths]


def test_greedy_equals_stepwise_argmax_of_full_forward():
    """Prompts of 3..17 tokens and 12 new ones, window 4: every row crosses the
    ring buffer's wrap point many times and the global layers' cache grows."""
    seed = _fresh_seed()
    params = _tiny_params(seed)
    prompts = _prompts(np.random.default_rng(seed), (3, 9, 17, 5))
    out = sample_prompts(params, prompts, jax.random.key(0), cfg=TINY, sampling=GREEDY)
    assert np.all(out.lengths == 12) and not np.any(out.stopped) and int(out.steps) == 12
    for row, ids in enumerate(prompts):
        seq = list(ids)
        for _ in range(12):
            seq.append(int(_full_logprobs(params, seq)[-1].argmax()))
        assert out.tokens[row].tolist() == seq[len(ids):], f"row {row} (seed {seed})"
        full = _full_logprobs(params, seq)[len(ids) - 1:-1]
        expected = full[np.arange(12), seq[len(ids):]]
        np.testing.assert_allclose(out.logprobs[row], expected, atol=2e-5, rtol=0)
        np.testing.assert_array_equal(out.sampling_logprobs[row], 0.0)


@pytest.mark.parametrize("sampling", [
    dataclasses.replace(GREEDY, temperature=0.0),
    dataclasses.replace(GREEDY, temperature=0.7),
    dataclasses.replace(GREEDY, temperature=1.0, top_k=20),
    dataclasses.replace(GREEDY, temperature=1.3, top_p=0.8),
], ids=["greedy", "temperature", "top-k", "top-p"])
def test_cached_equals_uncached(sampling):
    """Same keys, same token choice: the cache must change nothing but speed."""
    seed = _fresh_seed()
    params = _tiny_params(seed, flatten=0.05)
    tokens, mask = left_pad(_prompts(np.random.default_rng(seed), (4, 11, 7)), multiple=8)
    key = jax.random.key(seed)
    cached = sample(params, jnp.asarray(tokens), jnp.asarray(mask), key, cfg=TINY,
                    sampling=sampling)
    full = sample_uncached(params, tokens, mask, key, cfg=TINY, sampling=sampling)
    np.testing.assert_array_equal(cached.tokens, full.tokens)
    np.testing.assert_allclose(cached.logprobs, full.logprobs, atol=2e-5)
    np.testing.assert_allclose(cached.sampling_logprobs, full.sampling_logprobs, atol=2e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_row_does_not_depend_on_the_batch(temperature):
    """Row 0 alone, and row 0 beside longer prompts (so padded differently)."""
    seed = _fresh_seed()
    params = _tiny_params(seed, flatten=0.05)
    sampling = dataclasses.replace(GREEDY, temperature=temperature)
    prompts = _prompts(np.random.default_rng(seed), (5, 21, 13))
    key = jax.random.key(seed)
    together = sample_prompts(params, prompts, key, cfg=TINY, sampling=sampling)
    alone = sample_prompts(params, prompts[:1], key, cfg=TINY, sampling=sampling)
    np.testing.assert_array_equal(alone.tokens[0], together.tokens[0])
    np.testing.assert_allclose(alone.logprobs[0], together.logprobs[0], atol=2e-5)


def test_fan_out_equals_separate_prefills():
    seed = _fresh_seed()
    params = _tiny_params(seed, flatten=0.05)
    sampling = dataclasses.replace(GREEDY, temperature=1.0)
    prompts = _prompts(np.random.default_rng(seed), (6, 3, 10))
    key = jax.random.key(seed)
    fanned = sample_prompts(params, prompts, key, cfg=TINY, sampling=sampling, group=4)
    repeated = [p for p in prompts for _ in range(4)]
    separate = sample_prompts(params, repeated, key, cfg=TINY, sampling=sampling, group=1)
    np.testing.assert_array_equal(fanned.tokens, separate.tokens)
    np.testing.assert_allclose(fanned.logprobs, separate.logprobs, atol=2e-5)
    # The G samples of one prompt differ from each other (distinct per-row keys).
    assert len({tuple(r) for r in fanned.tokens[:4].tolist()}) > 1


def test_fan_out_prefills_each_prompt_once():
    """The start program's prefill batch is the number of distinct prompts, not P x G."""
    params = _tiny_params(0)
    tokens, mask = left_pad([[2, 3, 4], [2, 5]], multiple=8)
    ids, key = jnp.arange(2, dtype=jnp.int32), jax.random.key(0)
    start = decode.programs(TINY, GREEDY, 20, 4, sharding.local_plan()).start
    jaxpr = jax.make_jaxpr(start.fn)(params, None, tokens, mask, ids, key, None, None)
    text = str(jaxpr)
    assert "f32[2,8,64]" in text  # embeddings of 2 prompts x 8 tokens
    assert "f32[8,8,64]" not in text
    cache, rows = start(params, None, tokens, mask, ids, key, None, None)
    assert rows.rec.tokens.shape == (8, GREEDY.max_new_tokens)
    assert cache.lengths.tolist() == [3] * 4 + [2] * 4
    assert rows.rec.lengths.tolist() == [1] * 8  # each row's first token is chosen


def test_stop_tokens_end_rows_and_the_loop_exits_early():
    params = _tiny_params(1)
    prompts = [[2, 7, 8], [2, 9], [2, 11, 12, 13]]
    free = sample_prompts(params, prompts, jax.random.key(0), cfg=TINY,
                          sampling=dataclasses.replace(GREEDY, max_new_tokens=30))
    # Stop on every row's 3rd token: all rows end by step 3 and the loop stops there.
    stops = tuple(sorted({int(free.tokens[r, 2]) for r in range(3)}))
    out = sample_prompts(params, prompts, jax.random.key(0), cfg=TINY,
                         sampling=dataclasses.replace(GREEDY, max_new_tokens=30, stop_ids=stops))
    assert int(out.steps) <= 3 < 30
    for row in range(3):
        ids = out.tokens[row].tolist()
        n = next(i for i, t in enumerate(ids) if t in stops) + 1
        assert n <= 3 and out.lengths[row] == n and out.stopped[row]
        assert ids[:n] == free.tokens[row, :n].tolist()
        assert all(t == 0 for t in ids[n:]) and np.all(out.logprobs[row, n:] == 0)


def test_budget_rows_are_marked_not_stopped():
    out = sample_prompts(_tiny_params(2), [[2, 3]], jax.random.key(0), cfg=TINY,
                         sampling=dataclasses.replace(GREEDY, max_new_tokens=5))
    assert out.lengths.tolist() == [5] and out.stopped.tolist() == [False]


def test_reproducible_per_seed():
    params = _tiny_params(3, flatten=0.05)
    sampling = dataclasses.replace(GREEDY, temperature=1.0)
    run = lambda seed: sample_prompts(params, [[2, 5, 6, 7]] * 4, jax.random.key(seed),  # noqa: E731
                                      cfg=TINY, sampling=sampling).tokens
    np.testing.assert_array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


# --- the token choice itself, against the exact distributions ---------------------

def _draws(logits_row: np.ndarray, sampling: SamplerConfig, n: int, seed: int):
    """n independent draws from one logits row (as n batch rows)."""
    logits = jnp.asarray(np.repeat(logits_row[:, None], n, axis=1), jnp.float32)
    keys = jax.random.split(jax.random.key(seed), n)
    return jax.jit(lambda l, k: sampling_lib.choose_tokens(l, k, sampling))(logits, keys)


def _expected_probs(logits_row, temperature, top_k=0, top_p=1.0):
    z = logits_row.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(z.shape, bool)
    keep[order[:top_k or len(z)]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:
        sorted_p = p[order]
        before = np.cumsum(sorted_p) - sorted_p
        nucleus = np.zeros(z.shape, bool)
        nucleus[order[before < top_p]] = True
        p = np.where(nucleus & keep, p, 0.0)
        p /= p.sum()
    return p


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.7), (1.5, 8, 0.6)])
def test_sampled_frequencies_match_the_distribution(temperature, top_k, top_p):
    seed = _fresh_seed()
    rng = np.random.default_rng(seed)
    logits_row = rng.normal(size=512) * 2.0
    sampling = SamplerConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    n = 40_000
    token, logprob, sampling_lp = (np.asarray(x) for x in _draws(logits_row, sampling, n, seed))
    p = _expected_probs(logits_row, temperature, top_k, top_p)
    assert np.all(p[token] > 0), "sampled a token outside the allowed set"
    freq = np.bincount(token, minlength=512) / n
    # Every token's frequency within 6 binomial standard deviations, plus 3 counts of
    # slack for the skewed tails of tiny p: summed over all tokens and cases, a correct
    # sampler fails this about once in 50,000 runs (5 sd and 2 counts: once in 440).
    tol = 6 * np.sqrt(p * (1 - p) / n) + 3.0 / n
    assert np.all(np.abs(freq - p) <= tol), f"seed {seed}: max dev {np.abs(freq - p).max()}"
    full = logits_row - np.log(np.exp(logits_row - logits_row.max()).sum()) - logits_row.max()
    np.testing.assert_allclose(logprob, full[token], atol=1e-5)
    np.testing.assert_allclose(sampling_lp, np.log(p[token]), atol=1e-5)


def test_top_p_nucleus_wider_than_the_candidate_list(monkeypatch):
    """A flat distribution: the nucleus holds ~90% of 512 tokens, far beyond the
    first candidate list, so the full-sort fallback must take over."""
    monkeypatch.setattr(sampling_lib, "TOP_P_CANDIDATES", 16)
    logits_row = np.zeros(512)
    token, _, sampling_lp = (np.asarray(x) for x in
                             _draws(logits_row, SamplerConfig(top_p=0.9), 4000, 0))
    assert len(np.unique(token)) > 300
    nucleus = int(np.ceil(0.9 * 512))
    np.testing.assert_allclose(sampling_lp, -np.log(nucleus), atol=1e-4)


def test_greedy_choice_breaks_ties_to_the_first_token():
    logits = np.zeros((512, 2), np.float32)
    logits[[40, 300], 0] = 5.0
    logits[[511, 7], 1] = 3.0
    token, _, _ = sampling_lib.choose_tokens(
        jnp.asarray(logits), jax.random.split(jax.random.key(0), 2), SamplerConfig(temperature=0.0))
    assert token.tolist() == [40, 7] == np.argmax(logits, axis=0).tolist()


# --- cache layout -------------------------------------------------------------------

def test_sliding_layers_keep_only_a_window_sized_ring_buffer():
    cache = kv_cache.init_cache(TINY, batch=3, cache_len=40)
    for i in range(TINY.num_layers):
        size = 40 if TINY.is_global_layer(i) else TINY.sliding_window
        assert cache.keys[i].shape == (3, TINY.num_kv_heads, TINY.head_dim, size)
        assert cache.values[i].shape == (3, TINY.num_kv_heads, size, TINY.head_dim)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("keys", [True, False], ids=["keys", "values"])
def test_write_token_sets_each_rows_slot_and_nothing_else(dtype, keys):
    """A token's keys / values land at slot length mod S of its own row, in either
    dtype (bfloat16 takes a select, float32 a scatter), past the ring's wrap too."""
    rng = np.random.default_rng(0)
    b, k, dh, s = 3, 2, 4, 5
    shape = (b, k, dh, s) if keys else (b, k, s, dh)
    buf = rng.standard_normal(shape).astype(np.float32)
    new = rng.standard_normal((b, 1, k, dh)).astype(np.float32)
    lengths = np.asarray([0, 7, 14], np.int32)  # slots 0, 2, 4
    buf_j = jnp.asarray(buf, dtype)
    got = np.asarray(kv_cache._write_token(buf_j, jnp.asarray(new, dtype), jnp.asarray(lengths),
                                           keys).astype(jnp.float32))
    want = np.array(buf_j.astype(jnp.float32))
    new_r = np.asarray(jnp.asarray(new, dtype).astype(jnp.float32))
    for row, length in enumerate(lengths):
        if keys:
            want[row, :, :, length % s] = new_r[row, 0]
        else:
            want[row, :, length % s, :] = new_r[row, 0]
    np.testing.assert_array_equal(got, want)


def test_cache_mask_by_position():
    # Ring of 4 slots, window 4: after writing positions 0..9, slots hold 8, 9, 6, 7.
    mask = np.asarray(reference.cache_mask(jnp.asarray([9, 1]), 4, 4))
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]
    # Global cache of 6: a row at position 2 sees slots 0..2 only.
    assert np.asarray(reference.cache_mask(jnp.asarray([2]), 6, None)).tolist() == [
        [True, True, True, False, False, False]]


# --- bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("top_p", 0.0, "top_p must be in (0, 1]"),
    ("top_p", 1.5, "top_p must be in (0, 1]"),
    ("top_k", -1, "top_k must be >= 0"),
    ("temperature", -0.1, "temperature must be >= 0"),
    ("max_new_tokens", 0, "max_new_tokens must be positive"),
])
def test_bad_sampler_config(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        SamplerConfig(**{field: value})


def test_batch_not_divisible_by_group():
    with pytest.raises(ValueError, match="batch 10 is not divisible by the group size 4"):
        sampler.check_group(10, 4)


def test_prompt_longer_than_the_cache():
    tokens, mask = left_pad([[2] * 40], multiple=8)
    with pytest.raises(ValueError, match="exceeds the cache length 32"):
        sample(_tiny_params(0), jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0),
               cfg=TINY, sampling=GREEDY, max_cache_len=32)
    with pytest.raises(ValueError, match="exceeds the cache length"):
        kv_cache.prefill(_tiny_params(0), jnp.asarray(tokens), jnp.asarray(mask), TINY,
                         cache_len=16)


def test_benchmark_runs_and_rejects_bad_input():
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parent.parent / "benchmarks" / "sampler_throughput.py"
    # It runs (the engine's programs, as the benchmark lowers them), in the dtype asked.
    proc = subprocess.run([sys.executable, str(script), "--model", "tiny", "--batch", "4",
                           "--group", "2", "--prompt-len", "4", "--new-tokens", "4",
                           "--dtype", "bfloat16", "--repeats", "1", "--baseline-new-tokens",
                           "2", "--ignore-eos", "--json"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = __import__("json").loads(proc.stdout)
    assert result["dtype"] == "bfloat16" and result["tokens_per_s"] > 0
    assert result["generated_tokens"] == 16 and result["no_cache_baseline"]["tokens_per_s"] > 0
    for args, message in [(["--batch", "10", "--group", "4"], "not divisible by the group size"),
                          (["--new-tokens", "0"], "must be positive")]:
        proc = subprocess.run([sys.executable, str(script), "--model", "tiny", *args],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_decode_step_parts_benchmark_runs_and_rejects_bad_input(tmp_path):
    import json
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parent.parent / "benchmarks" / "decode_step_parts.py"
    out = tmp_path / "parts.json"
    proc = subprocess.run([sys.executable, str(script), "--model", "tiny", "--batch", "4",
                           "--repeats", "1", "--no-machine", "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result["ms"]) == {"float32", "bfloat16", "choose"}
    assert all(t > 0 for t in result["ms"]["choose"].values())
    assert all(result["ms"][d]["logits_vocab_major"] > 0 for d in ("float32", "bfloat16"))
    for args, message in [(["--batch", "0"], "must be positive"),
                          (["--dtypes", "float64"], "unknown dtype")]:
        proc = subprocess.run([sys.executable, str(script), "--model", "tiny", *args],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
