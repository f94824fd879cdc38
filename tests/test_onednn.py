"""oneDNN's bfloat16 matmul behind jax.ffi (grpo_jax/kernels/cpu/): the custom call
against float64 NumPy in every transpose, the model's einsums through it, its
gradients against the float64 formula, the tiny model's forward and sampler on it,
and what happens where it cannot build or run."""
from __future__ import annotations

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _tiny_model import random_params, sampler_drift
from grpo_jax.config import TrainConfig
from grpo_jax.kernels.cpu import amx, onednn
from grpo_jax.model import dtype_choice, gemma3
from grpo_jax.model.config import TINY
from grpo_jax.model.load import with_dtype
from grpo_jax.model.matmul import matmul

WHY_NOT = onednn.unavailable()
needs_onednn = pytest.mark.skipif(WHY_NOT is not None, reason=f"oneDNN cannot run: {WHY_NOT}")


@pytest.fixture
def every_row_count(monkeypatch):
    """oneDNN for matmuls of any row count: the tests' small shapes stand for large ones."""
    monkeypatch.setattr(onednn, "MIN_ROWS", 1)


def bf16(rng, shape) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)


def f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def test_it_runs_on_this_machine_kind():
    """x86-64 Linux installs oneDNN with the package and has g++: the call must run
    there (elsewhere the model keeps XLA's matmul, tested below)."""
    import platform
    import sys
    if platform.machine() == "x86_64" and sys.platform == "linux":
        assert WHY_NOT is None, WHY_NOT


@needs_onednn
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_dot_in_every_transpose_matches_float64(transpose_a, transpose_b):
    rng = np.random.default_rng()
    m, k, n = 37, 300, 29  # odd sizes: no tile divides them
    a = bf16(rng, (k, m) if transpose_a else (m, k))
    b = bf16(rng, (n, k) if transpose_b else (k, n))
    want = (f64(a).T if transpose_a else f64(a)) @ (f64(b).T if transpose_b else f64(b))
    got = jax.jit(onednn.dot, static_argnums=(2, 3))(a, b, transpose_a, transpose_b)
    assert got.dtype == jnp.float32 and got.shape == (m, n)
    # Products of bf16 numbers are exact in float32; only float32 summation rounds.
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


# The model's einsums: projections, LoRA's two halves, the logits (ellipsis,
# batch-major and the sampler's vocabulary-major), the vocab-parallel form.
EQUATIONS = {
    "btd,dhk->bthk": ((2, 3, 16), (16, 2, 8)),
    "bthk,hkd->btd": ((2, 3, 2, 8), (2, 8, 16)),
    "btd,df->btf": ((2, 3, 16), (16, 24)),
    "btd,dr->btr": ((2, 3, 16), (16, 4)),
    "btr,rhk->bthk": ((2, 3, 4), (4, 2, 8)),
    "...d,vd->...v": ((2, 3, 16), (40, 16)),
    "bd,vd->vb": ((5, 16), (40, 16)),
    "nsd,vd->nsv": ((2, 3, 16), (40, 16)),
    "dt,df->tf": ((16, 3), (16, 24)),  # a transposed x, and an output that needs a transpose:
    "bd,df->fb": ((3, 16), (16, 24)),
}


@needs_onednn
@pytest.mark.parametrize("equation", list(EQUATIONS))
def test_model_einsums_and_their_gradients_match_float64(equation, every_row_count):
    rng = np.random.default_rng()
    xs, ws = EQUATIONS[equation]
    x, w = bf16(rng, xs), bf16(rng, ws)
    want = np.einsum(equation, f64(x), f64(w))
    got = jax.jit(lambda x, w: matmul(equation, x, w, jnp.bfloat16, jnp.float32,
                                      impl="onednn"))(x, w)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * 16)
    # The custom call is in the program (no silent XLA fallback).
    hlo = jax.jit(lambda x, w: onednn.einsum(equation, x, w)).lower(x, w).as_text()
    assert onednn.TARGET in hlo

    # Gradients of <c, einsum(x, w)>: the float64 formula is c contracted with the other
    # operand. The backward's matmuls take bf16 operands (c rounded), so bf16 tolerance.
    c = rng.standard_normal(want.shape)
    out_spec = equation.split("->")[1]
    x_spec, w_spec = equation.split("->")[0].split(",")
    if "..." in equation:
        x_spec, out_spec = "ab" + x_spec[3:], "ab" + out_spec[3:]
    gx, gw = jax.grad(lambda x, w: jnp.sum(jnp.asarray(c, jnp.float32) * onednn.einsum(
        equation, x, w)), argnums=(0, 1))(x.astype(jnp.float32), w.astype(jnp.float32))
    want_gx = np.einsum(f"{out_spec},{w_spec}->{x_spec}", c, f64(w))
    want_gw = np.einsum(f"{x_spec},{out_spec}->{w_spec}", f64(x), c)
    for got_g, want_g in ((gx, want_gx), (gw, want_gw)):
        scale = np.abs(want_g).max()
        assert np.abs(np.asarray(got_g) - want_g).max() < 2 ** -7 * scale, equation


def test_einsums_that_are_not_one_matmul_or_have_few_rows_are_left_to_xla():
    x, w = jnp.ones((2, 3, 4), jnp.bfloat16), jnp.ones((2, 4, 5), jnp.bfloat16)
    assert onednn.einsum("bij,bjk->bik", x, w) is None  # a batch axis
    assert onednn.einsum("ii,ij->j", jnp.ones((4, 4)), jnp.ones((4, 5))) is None
    # matmul() then computes it with XLA, same numbers.
    got = matmul("bij,bjk->bik", x, w, jnp.bfloat16, jnp.float32, impl="onednn")
    np.testing.assert_array_equal(np.asarray(got), np.full((2, 3, 5), 4.0))
    # float32 compute never goes through oneDNN (it computes bfloat16 only).
    hlo = jax.jit(lambda x, w: matmul("mk,kn->mn", x, w, jnp.float32, impl="onednn")).lower(
        jnp.ones((3, 4)), jnp.ones((4, 5))).as_text()
    assert onednn.TARGET not in hlo
    # A decode step's few rows (tokens) stay with XLA; an update's many go to oneDNN.
    w = jnp.ones((16, 8), jnp.bfloat16)
    for rows, want in ((onednn.MIN_ROWS - 1, False), (onednn.MIN_ROWS, True)):
        hlo = jax.jit(lambda x: matmul("btd,df->btf", x, w, jnp.bfloat16, impl="onednn")).lower(
            jnp.ones((1, rows, 16), jnp.bfloat16)).as_text()
        assert (onednn.TARGET in hlo) == want, rows


@needs_onednn
def test_tiny_model_on_onednn_matches_xla_and_its_sampler_matches_its_forward(every_row_count):
    """The whole forward on oneDNN against XLA's bf16 forward (both bf16: within bf16
    rounding), and the KV-cached sampler's log-probs against the full forward, both
    on oneDNN, within the drift test_dtype_choice allows XLA's bf16."""
    xla = dataclasses.replace(TINY, dtype="bfloat16", param_dtype="bfloat16")
    dnn = dataclasses.replace(xla, matmul_impl="onednn")
    rng = np.random.default_rng()
    params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), random_params(TINY, rng))
    tokens = jnp.asarray(rng.integers(3, TINY.vocab_size, size=(2, 12)), jnp.int32)
    mask = jnp.ones_like(tokens, bool)
    positions = gemma3.left_padded_positions(mask)
    forward = jax.jit(gemma3.forward, static_argnums=4)
    want = jax.nn.log_softmax(forward(params, tokens, positions, mask, xla), -1)
    got = jax.nn.log_softmax(forward(params, tokens, positions, mask, dnn), -1)
    assert onednn.TARGET in forward.lower(params, tokens, positions, mask, dnn).as_text()
    diff = np.abs(np.asarray(got) - np.asarray(want))
    assert diff.mean() < 2e-2 and diff.max() < 0.25, (diff.mean(), diff.max())

    drifts = sampler_drift(params, dnn, rng, prompt_lens=(5, 9), new_tokens=10)
    assert drifts.mean() < 2e-2 and drifts.max() < 0.25, (drifts.mean(), drifts.max())


class Rates:
    """A probe timer from GFLOP/s per candidate."""

    def __init__(self, gflops):
        self.gflops = gflops

    def __call__(self, candidate, shapes):
        return sum(2.0 * m * k * n for m, k, n, *_ in shapes) / (self.gflops[candidate] * 1e9)


@pytest.mark.parametrize("onednn_rate, want", [
    (1600.0, ("bfloat16", "onednn")),  # AMX: oneDNN well ahead of XLA's bf16
    (1000.0 * dtype_choice.MIN_SPEEDUP_SAME_DTYPE, ("bfloat16", "onednn")),
    (1040.0, ("bfloat16", "xla")),     # within noise: XLA (and its fusions) stays
    (1210.0, ("bfloat16", "xla")),     # AMX machine A's probe lead: its step was slower
])
def test_the_probe_picks_onednn_only_where_it_wins(tmp_path, monkeypatch, onednn_rate, want):
    monkeypatch.setattr(onednn, "unavailable", lambda: None)
    monkeypatch.setattr(dtype_choice, "cache_path", lambda: tmp_path / "choice.json")
    timer = Rates({"float32": 300.0, "bfloat16": 1000.0, dtype_choice.ONEDNN: onednn_rate})
    assert dtype_choice.fastest(TINY, timer=timer, backend="cpu") == want
    # Forbidding oneDNN (--matmul xla) never times it.
    assert dtype_choice.fastest(TINY, timer=Rates({"float32": 300.0, "bfloat16": 1000.0}),
                                backend="cpu", onednn_allowed=False) == ("bfloat16", "xla")


def test_a_cached_choice_follows_todays_margins_not_the_one_it_was_written_with(
        tmp_path, monkeypatch):
    """The cache keeps the probe's rates; a choice written under older margins (oneDNN
    at a 1.21x lead) is made again from them, without probing."""
    monkeypatch.setattr(onednn, "unavailable", lambda: None)
    monkeypatch.setattr(dtype_choice, "cache_path", lambda: tmp_path / "choice.json")
    key = dtype_choice.machine_key(TINY, dtype_choice.CANDIDATES)
    (tmp_path / "choice.json").write_text(json.dumps({key: {
        "dtype": dtype_choice.ONEDNN,
        "gflops": {"float32": 220.0, "bfloat16": 956.0, dtype_choice.ONEDNN: 1160.0}}}))

    def no_probe(candidate, shapes):
        raise AssertionError("probed although the rates were cached")

    assert dtype_choice.fastest(TINY, timer=no_probe, backend="cpu") == ("bfloat16", "xla")


def test_where_it_cannot_build_the_model_keeps_xla_in_one_line(tmp_path, monkeypatch, caplog):
    with pytest.raises(FileNotFoundError, match="no C\\+\\+ compiler 'no-such-g\\+\\+'"):
        onednn.build(compiler="no-such-g++")
    monkeypatch.setattr(onednn, "unavailable", lambda: "no C++ compiler 'g++' on PATH")
    monkeypatch.setattr(amx, "unavailable", lambda: "no C++ compiler 'g++' on PATH")
    monkeypatch.setattr(dtype_choice, "cache_path", lambda: tmp_path / "choice.json")
    monkeypatch.setattr(dtype_choice, "time_matmuls",
                        Rates({"float32": 300.0, "bfloat16": 1000.0}))
    caplog.set_level(logging.INFO, logger="grpo_jax")
    cfg = with_dtype(TINY, "auto")
    assert (cfg.dtype, cfg.matmul_impl) == ("bfloat16", "xla")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "oneDNN not timed: no C++ compiler" in lines[0], lines
    # Asked for by name, it is a clear error instead.
    with pytest.raises(ValueError, match="--matmul onednn cannot run here: no C\\+\\+ compiler"):
        with_dtype(TINY, "auto", "onednn")


def test_bad_matmul_settings_are_one_clear_error(monkeypatch):
    monkeypatch.setattr(onednn, "unavailable", lambda: None)
    with pytest.raises(ValueError, match="--matmul onednn computes in bfloat16"):
        with_dtype(TINY, "float32", "onednn")
    with pytest.raises(ValueError, match="matmul implementation 'mkl': choose one of auto"):
        with_dtype(TINY, "auto", "mkl")
    with pytest.raises(ValueError, match="matmul implementation 'mkl': choose one of auto"):
        TrainConfig(matmul="mkl")
    with pytest.raises(ValueError, match="matmul implementation 'auto': choose one of xla"):
        dataclasses.replace(TINY, matmul_impl="auto")
    # An explicit dtype with matmul auto is XLA's, no probe.
    assert with_dtype(TINY, "bfloat16").matmul_impl == "xla"
    assert with_dtype(TINY, "bfloat16", "onednn").matmul_impl == "onednn"


def test_several_devices_keep_xla(monkeypatch):
    """A custom call has no sharding rule: under a mesh GSPMD would gather its
    operands onto every device, so it is offered to one-device runs only."""
    monkeypatch.setattr(jax, "local_device_count", lambda: 8)
    why = onednn.unavailable()
    assert why is not None and "one device only" in why
