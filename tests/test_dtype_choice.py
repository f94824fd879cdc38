"""`--dtype auto` (grpo_jax.model.dtype_choice) and the bfloat16 path it may choose:
the choice follows the measured rates, is kept per machine and model, survives a
damaged cache; the one matmul accumulates in float32 (against float64 NumPy); the
KV-cached sampler agrees with the full forward in bfloat16 at bfloat16's tolerance;
a tiny training run in bfloat16 trains."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _tiny_model import random_params, sampler_drift
from digit_reward_train import digit_fraction
from grpo_jax import dry_run, rewards, train
from grpo_jax.config import TrainConfig
from grpo_jax.model import dtype_choice
from grpo_jax.model.config import GEMMA3_270M, TINY
from grpo_jax.model.load import with_dtype
from grpo_jax.model.matmul import matmul
from grpo_jax.presets import TRAIN_PRESETS
from grpo_jax.rewards import RewardConfig


@pytest.fixture(autouse=True)
def without_onednn(monkeypatch):
    """The probe as on a machine where oneDNN cannot run: the XLA choices alone
    (the oneDNN candidate is tested in test_onednn.py)."""
    monkeypatch.setattr(dtype_choice.onednn, "unavailable", lambda: "hidden in this test")


class FakeTimer:
    """Seconds per probe pass from given GFLOP/s, counting its calls."""

    def __init__(self, gflops: dict[str, float]):
        self.gflops, self.calls = gflops, []

    def __call__(self, dtype, shapes):
        self.calls.append(dtype)
        flops = sum(2.0 * m * k * n for m, k, n, *_ in shapes)
        return flops / (self.gflops[dtype] * 1e9)


@pytest.fixture
def cache_dir(tmp_path):
    yield from _compilation_cache(str(tmp_path))


@pytest.fixture
def no_cache():
    yield from _compilation_cache(None)


def _compilation_cache(directory):
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", directory)
    try:
        yield None if directory is None else Path(directory)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


@pytest.mark.parametrize("f32, bf16, want", [
    (100.0, 200.0, "bfloat16"),   # the AVX-512 BF16 kind
    (310.0, 260.0, "float32"),    # where XLA's bf16 is slower (AVX2 only)
    (100.0, 110.0, "float32"),    # a near tie keeps the wider type
    (100.0, 100.0 * dtype_choice.MIN_SPEEDUP, "bfloat16"),
])
def test_choice_follows_the_measured_rates(cache_dir, f32, bf16, want):
    timer = FakeTimer({"float32": f32, "bfloat16": bf16})
    assert dtype_choice.fastest_dtype(TINY, timer=timer, backend="cpu") == want
    assert sorted(timer.calls) == ["bfloat16", "float32"]


def test_choice_is_kept_per_machine_and_model(cache_dir, caplog):
    caplog.set_level(logging.INFO, logger="grpo_jax")
    timer = FakeTimer({"float32": 100.0, "bfloat16": 250.0})
    assert dtype_choice.fastest_dtype(TINY, timer=timer, backend="cpu") == "bfloat16"
    assert "dtype auto: bfloat16" in caplog.text and "probed now" in caplog.text
    caplog.clear()
    # Read back, not measured: a timer that would say otherwise is never called.
    other = FakeTimer({"float32": 300.0, "bfloat16": 100.0})
    assert dtype_choice.fastest_dtype(TINY, timer=other, backend="cpu") == "bfloat16"
    assert other.calls == []
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "cached in" in lines[0] and "bfloat16 250" in lines[0], lines
    # Another model's shapes are probed on their own.
    assert dtype_choice.fastest_dtype(GEMMA3_270M, timer=other, backend="cpu") == "float32"
    kept = json.loads((cache_dir / dtype_choice.CACHE_FILE).read_text())
    assert len(kept) == 2 and {e["dtype"] for e in kept.values()} == {"bfloat16", "float32"}


@pytest.mark.parametrize("damage", ["{not json", "[1, 2]", '{"KEY": {"dtype": "int8"}}'])
def test_a_damaged_cache_is_probed_again_and_rewritten(cache_dir, damage):
    key = dtype_choice.machine_key(TINY)
    (cache_dir / dtype_choice.CACHE_FILE).write_text(damage.replace("KEY", key))
    timer = FakeTimer({"float32": 100.0, "bfloat16": 300.0})
    assert dtype_choice.fastest_dtype(TINY, timer=timer, backend="cpu") == "bfloat16"
    assert len(timer.calls) == 2
    kept = json.loads((cache_dir / dtype_choice.CACHE_FILE).read_text())
    assert kept[key]["dtype"] == "bfloat16"


def test_no_cache_probes_each_time_and_accelerators_skip_the_probe(no_cache):
    timer = FakeTimer({"float32": 100.0, "bfloat16": 300.0})
    for _ in range(2):
        assert dtype_choice.fastest_dtype(TINY, timer=timer, backend="cpu") == "bfloat16"
    assert len(timer.calls) == 4
    never = FakeTimer({})
    assert dtype_choice.fastest_dtype(TINY, timer=never, backend="tpu") == "bfloat16"
    assert never.calls == []


def test_the_real_probe_times_the_model_shapes(cache_dir):
    shapes = dtype_choice.probe_shapes(TINY)
    assert shapes[-1][:3] == (dtype_choice.DECODE_ROWS, TINY.embed_dim, TINY.vocab_size)
    seconds = {d: dtype_choice.time_matmuls(d, shapes, repeats=2)
               for d in dtype_choice.CANDIDATES[:2]}
    assert all(np.isfinite(s) and s > 0 for s in seconds.values()), seconds
    assert dtype_choice.fastest_dtype(TINY) in dtype_choice.CANDIDATES


def test_auto_resolves_where_the_model_is_built(cache_dir, monkeypatch):
    monkeypatch.setattr(dtype_choice, "time_matmuls",
                        FakeTimer({"float32": 100.0, "bfloat16": 300.0}))
    cfg = with_dtype(TINY, "auto")
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "bfloat16")
    assert with_dtype(TINY, None) == TINY
    # A dry run compiles (for a TPU) and never probes.
    monkeypatch.setattr(dtype_choice, "time_matmuls", FakeTimer({}))
    assert dry_run.run_model_config(dataclasses.replace(
        TRAIN_PRESETS["tiny"], dtype="auto")).dtype == "bfloat16"
    # The CPU presets ask for it; a typo is one clear error.
    assert TRAIN_PRESETS["cpu-270m"].dtype == "auto"
    with pytest.raises(ValueError, match="dtype 'bf16': choose one of auto, float32"):
        TrainConfig(dtype="bf16")


@pytest.mark.parametrize("shape", [(7, 24, 40), (16, 64, 512)])
def test_matmul_accumulates_bfloat16_in_float32(shape):
    """The one matmul: bf16 operands, the result in float32 or rounded to bf16, each
    within bf16 resolution of the float64 product of the rounded operands."""
    m, k, n = shape
    rng = np.random.default_rng()
    x, w = rng.normal(size=(m, k)), rng.normal(size=(k, n))
    x16, w16 = (np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64) for a in (x, w))
    want = x16 @ w16
    got32 = matmul("mk,kn->mn", jnp.asarray(x), jnp.asarray(w), jnp.bfloat16, jnp.float32)
    assert got32.dtype == jnp.float32
    # Not to float32's 1e-6: a CI run found whole rows off by ~1e-4 relative (XLA:CPU's
    # bf16 dot on AVX-512 BF16), so the bound is bf16's resolution, not float32's.
    np.testing.assert_allclose(np.asarray(got32), want, rtol=2 ** -8, atol=2 ** -8 * np.sqrt(k))
    got16 = matmul("mk,kn->mn", jnp.asarray(x), jnp.asarray(w), jnp.bfloat16)
    assert got16.dtype == jnp.bfloat16
    # Then one rounding to bf16 on top.
    np.testing.assert_allclose(np.asarray(got16, np.float64), want, rtol=2 ** -7,
                               atol=2 ** -8 * np.sqrt(k))


@pytest.mark.parametrize("equation, spelled, x_shape, w_shape", [
    ("mk,kn->mn", "mk,kn->mn", (7, 24), (24, 40)),
    ("btd,dhk->bthk", "btd,dhk->bthk", (2, 5, 16), (16, 3, 8)),
    ("...d,vd->...v", "abd,vd->abv", (2, 3, 16), (40, 16)),  # the logits' "..."
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_gradients_against_float64(equation, spelled, x_shape, w_shape, dtype):
    """d sum(c * matmul(x, w)) by x and w, against the float64 einsums of the rounded
    operands: the bf16 backward takes the cotangent in bf16 (its matmuls run at
    bf16's rate) and stays within bf16 resolution of the exact gradient."""
    rng = np.random.default_rng()
    x, w = rng.normal(size=x_shape), rng.normal(size=w_shape)
    c = rng.normal(size=np.einsum(spelled, x, w).shape)

    def loss(x, w):
        return jnp.sum(jnp.asarray(c, jnp.float32) * matmul(equation, x, w, dtype, jnp.float32))

    dx, dw = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x, jnp.float32),
                                            jnp.asarray(w, jnp.float32))
    x_r, w_r, c_r = (np.asarray(jnp.asarray(a, dtype), np.float64) for a in (x, w, c))
    inputs, out = spelled.split("->")
    xs, ws = inputs.split(",")
    want_dx = np.einsum(f"{out},{ws}->{xs}", c_r, w_r)
    want_dw = np.einsum(f"{xs},{out}->{ws}", x_r, c_r)
    tol = 2 ** -7 if dtype == "bfloat16" else 1e-5
    for got, want in ((dx, want_dx), (dw, want_dw)):
        assert got.dtype == jnp.float32 and got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), want, rtol=tol,
                                   atol=4 * tol * np.sqrt(np.mean(want ** 2)))


def test_bfloat16_sampler_agrees_with_the_bfloat16_forward():
    """The sampler's log-probs against the full forward, both in bfloat16: not the
    float32 ~1e-6, but within bf16 rounding (they take other matmul shapes)."""
    cfg = dataclasses.replace(TINY, dtype="bfloat16", param_dtype="bfloat16")
    rng = np.random.default_rng()
    params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), random_params(TINY, rng))
    drifts = sampler_drift(params, cfg, rng)
    # Measured on the embedded 270M: mean 6e-3, max 0.10 (float32: 2e-6, 1e-5).
    assert drifts.mean() < 2e-2 and drifts.max() < 0.25, (drifts.mean(), drifts.max())


def test_a_bfloat16_run_trains(tmp_path):
    # A reward random text earns unevenly, so groups have advantages and LoRA gradients.
    rewards.register_reward("digit_fraction", digit_fraction)
    cfg = dataclasses.replace(TRAIN_PRESETS["tiny"], tensorboard=False, eval_problems=0,
                              dtype="bfloat16", steps=2, save_every=2,
                              output_dir=str(tmp_path / "run"),
                              rewards=RewardConfig(functions=(("digit_fraction", 1.0),)))
    train.train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in rows)
    assert all(r["grad_norm"] > 0 for r in rows)
    # bf16 rounding, so bf16 is in effect: float32's drift on this run is ~5e-7.
    assert all(1e-4 < r["logprob_drift"] < 2e-2 for r in rows), [r["logprob_drift"] for r in rows]
