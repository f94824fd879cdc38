"""The AMX kernels (grpo_jax/kernels/cpu/amx.py): the tile packing against a NumPy
restatement of its index map (everywhere), the decode loop's custom calls against
float64 NumPy at every row count that exercises an edge tile, the tiny model's sampler
on them against its full forward and against XLA's sampler, the log-softmax calls and
their custom_vjp against float64 NumPy's formula and the model's XLA path, and what
happens where they cannot run."""
from __future__ import annotations

import dataclasses
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _tiny_model import random_params, sampler_drift
from grpo_jax import decode
from grpo_jax.config import SamplerConfig
from grpo_jax.kernels.cpu import amx
from grpo_jax.model import gemma3
from grpo_jax.model.config import TINY
from grpo_jax.model.load import cpu_kernels, with_dtype
from grpo_jax.model.matmul import matmul
from grpo_jax.sampler import sample_prompts

WHY_NOT = amx.unavailable()
needs_amx = pytest.mark.skipif(WHY_NOT is not None, reason=f"AMX cannot run: {WHY_NOT}")
BF16_TINY = dataclasses.replace(TINY, dtype="bfloat16", param_dtype="bfloat16")


def bf16(rng, shape) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)


def f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def test_it_runs_on_every_amx_machine():
    if {"amx_tile", "amx_bf16"} <= amx.cpu_flags():
        assert WHY_NOT is None, WHY_NOT


@pytest.mark.parametrize("equation, shape, contracted", [
    ("btd,df->btf", (64, 96), 1),
    ("btd,dhk->bthk", (64, 2, 32), 1),
    ("bthk,hkd->btd", (2, 32, 96), 2),
])
def test_packing_puts_every_element_where_the_tiles_read_it(equation, shape, contracted):
    """Element [k, n] of the weight's matrix sits at [n//32, k//32, n//16 % 2,
    k//2 % 16, n % 16, k % 2], restated here element by element."""
    w = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) % 251  # exact in bf16
    packed = amx.pack(equation, jnp.asarray(w))
    k = int(np.prod(shape[:contracted]))
    matrix = w.reshape(k, -1)
    got = np.asarray(packed.data, np.float32)
    assert got.shape == (matrix.shape[1] // 32, k // 32, 2, 16, 16, 2)
    for kk in range(k):
        for n in range(matrix.shape[1]):
            assert got[n // 32, kk // 32, n // 16 % 2, kk // 2 % 16, n % 16, kk % 2] \
                == matrix[kk, n]
    assert packed.equation == equation and packed.shape == shape


def test_what_cannot_be_packed_says_why():
    assert not amx.packable("btd,df->btf", (64, 100))    # not a multiple of 32
    assert not amx.packable("btd,fd->btf", (64, 64))     # w contracted last
    assert not amx.packable("bd,vd->vb", (512, 64))      # the logits' layout
    with pytest.raises(ValueError, match="cannot be packed"):
        amx.pack("btd,df->btf", jnp.ones((64, 100)))
    packed = amx.pack("btd,df->btf", jnp.ones((64, 64)))
    with pytest.raises(ValueError, match="cannot run 'btf,fd->btd'"):
        amx.packed_einsum("btf,fd->btd", jnp.ones((1, 1, 64)), packed)
    with pytest.raises(ValueError, match="does not contract"):
        amx.packed_einsum("btd,df->btf", jnp.ones((1, 1, 32)), packed)
    with pytest.raises(ValueError, match="multiples of 32"):
        amx.rows_matmul(jnp.ones((2, 64)), jnp.ones((100, 64)))
    with pytest.raises(ValueError, match="takes x \\[M, K\\]"):
        amx.rows_matmul(jnp.ones((2, 32)), jnp.ones((64, 64)))


@needs_amx
@pytest.mark.parametrize("rows", [1, 7, 16, 17, 33, 64])
@pytest.mark.parametrize("equation, shape", [
    ("btd,df->btf", (96, 64)),
    ("btd,dhk->bthk", (64, 3, 32)),
    ("bthk,hkd->btd", (2, 48, 160)),
])
def test_packed_product_matches_float64(rows, equation, shape):
    """Row counts below, at and across the 16-row tiles and the 32-row blocks."""
    rng = np.random.default_rng()
    x_shape = (rows, 1) + shape[:len(shape) - (len(equation.split("->")[1]) - 2)]
    x, w = bf16(rng, x_shape), bf16(rng, shape)
    got = jax.jit(lambda x, w: amx.packed_einsum(equation, x, amx.pack(equation, w)))(x, w)
    want = np.einsum(equation, f64(x), f64(w))
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


@needs_amx
@pytest.mark.parametrize("rows", [1, 7, 16, 17, 33, 64])
def test_rows_product_matches_float64(rows):
    rng = np.random.default_rng()
    x, w = bf16(rng, (rows, 96)), bf16(rng, (320, 96))  # R: 10 blocks, uneven over threads
    got = jax.jit(amx.rows_matmul)(x, w)
    assert got.shape == (320, rows) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), f64(w) @ f64(x).T, rtol=1e-5, atol=1e-4)


@needs_amx
def test_the_model_matmul_sends_packed_weights_to_the_kernel():
    rng = np.random.default_rng()
    x, w = bf16(rng, (4, 1, 64)), bf16(rng, (64, 128))
    packed = amx.pack("btd,df->btf", w)
    f = jax.jit(lambda x, p: matmul("btd,df->btf", x, p, jnp.bfloat16, jnp.float32))
    assert amx.PACKED_TARGET in f.lower(x, packed).as_text()
    np.testing.assert_allclose(np.asarray(f(x, packed)), np.einsum("btd,df->btf", f64(x), f64(w)),
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="computes in bfloat16"):
        matmul("btd,df->btf", x, packed, jnp.float32)


@needs_amx
def test_tiny_model_sampler_on_amx_matches_its_forward_and_xla():
    """The KV-cached sampler with every projection and the logits on AMX: its
    log-probs against the full forward (XLA's bf16) within the drift allowed XLA's
    own bf16 sampler, and its first greedy step's log-probs against XLA's sampler's
    (later steps may part at a near-tie: both bf16, summed in another order)."""
    cfg = dataclasses.replace(BF16_TINY, cpu_kernels="amx")
    rng = np.random.default_rng()
    params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), random_params(TINY, rng))
    progs = decode.programs(cfg, SamplerConfig(max_new_tokens=4, temperature=0.0),
                            16, 1, decode.sharding.local_plan())
    packed, _ = decode.place_weights(params, None, cfg, decode.sharding.local_plan())
    hlo = progs.decode.lower(packed, None, *jax.eval_shape(
        lambda: progs.start.fn(packed, None, jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), bool),
                               jnp.zeros(1, jnp.int32), jax.random.key(0), None, None)),
        jnp.ones(1, bool), jnp.int32(1), None, None).as_text()
    for target in (amx.PACKED_TARGET, amx.ROWS_TARGET, amx.WRITE_TARGET, amx.GATHER_TARGET):
        assert target in hlo, target

    drifts = sampler_drift(params, cfg, rng, prompt_lens=(5, 9), new_tokens=10)
    assert drifts.mean() < 2e-2 and drifts.max() < 0.25, (drifts.mean(), drifts.max())

    prompts = [[2, *rng.integers(3, TINY.vocab_size, size=n).tolist()] for n in (4, 7, 11)]
    greedy = SamplerConfig(max_new_tokens=12, temperature=0.0, stop_ids=())
    got = sample_prompts(params, prompts, jax.random.key(0), cfg=cfg, sampling=greedy)
    want = sample_prompts(params, prompts, jax.random.key(0), cfg=BF16_TINY, sampling=greedy)
    np.testing.assert_allclose(got.logprobs[:, 0], want.logprobs[:, 0], atol=0.05)


@needs_amx
def test_packing_is_done_once_for_the_same_weights():
    cfg = dataclasses.replace(BF16_TINY, cpu_kernels="amx")
    params = jax.tree.map(lambda w: w.astype(jnp.bfloat16),
                          random_params(TINY, np.random.default_rng(0)))
    plan = decode.sharding.local_plan()
    first, _ = decode.place_weights(params, None, cfg, plan)
    again, _ = decode.place_weights(params, None, cfg, plan)
    assert first is again
    other = jax.tree.map(lambda w: w + 1, params)
    assert decode.place_weights(other, None, cfg, plan)[0] is not first
    assert isinstance(first["layers"][0]["mlp"]["gate"], amx.PackedWeight)
    assert not isinstance(first["embed"], amx.PackedWeight)


def test_bfloat16_runs_the_amx_kernels_where_they_run_and_never_otherwise(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="grpo_jax")
    monkeypatch.setattr(amx, "unavailable", lambda: None)
    assert with_dtype(TINY, "bfloat16").cpu_kernels == "amx"
    assert any("CPU kernels: AMX" in r.getMessage() for r in caplog.records)
    assert with_dtype(TINY, "bfloat16", "xla").cpu_kernels == "xla"  # asked for XLA
    assert with_dtype(TINY, "float32").cpu_kernels == "xla"
    monkeypatch.setattr(amx, "unavailable", lambda: "this CPU has no amx_tile")
    assert cpu_kernels(BF16_TINY) == "xla"
    with pytest.raises(ValueError, match="AMX kernels compute in bfloat16"):
        dataclasses.replace(TINY, cpu_kernels="amx")
    with pytest.raises(ValueError, match="CPU kernels 'tpu': choose one of xla, amx"):
        dataclasses.replace(BF16_TINY, cpu_kernels="tpu")


def test_several_devices_or_no_amx_keep_xla(monkeypatch):
    monkeypatch.setattr(jax, "local_device_count", lambda: 8)
    why = amx.unavailable()
    assert why is not None and "one device only" in why


def test_a_cpu_without_amx_says_so(monkeypatch):
    monkeypatch.setattr(amx, "cpu_flags", lambda: {"avx2", "avx512f", "amx_tile"})
    monkeypatch.setattr(amx.sys, "platform", "linux")
    monkeypatch.setattr(amx.platform, "machine", lambda: "x86_64")
    assert amx.cpu_reason() == "this CPU has no amx_bf16"
    monkeypatch.setattr(amx.platform, "machine", lambda: "aarch64")
    assert "x86-64 Linux" in amx.cpu_reason()


@needs_amx
@pytest.mark.parametrize("keys", [True, False])
def test_token_write_sets_each_rows_slot_in_place_and_nothing_else(keys):
    """Against a NumPy restatement; each row at its own slot (one at the ring's last)."""
    rng = np.random.default_rng()
    rows, heads, dim, size = 3, 2, 32, 7
    shape = (rows, heads, dim, size) if keys else (rows, heads, size, dim)
    buf, token = bf16(rng, shape), bf16(rng, (rows, heads, dim))
    slots = jnp.asarray([0, 6, 3], jnp.int32)
    want = np.array(f64(buf))
    for b, s in enumerate(np.asarray(slots)):
        if keys:
            want[b, :, :, s] = f64(token)[b]
        else:
            want[b, :, s, :] = f64(token)[b]
    write = jax.jit(lambda buf, t, s: amx.write_token(buf, t, s, keys), donate_argnums=0)
    hlo = write.lower(buf, token, slots).compile().as_text()
    assert amx.WRITE_TARGET in hlo and " copy(" not in hlo  # aliased: no copy of the cache
    np.testing.assert_array_equal(f64(write(buf, token, slots)), want)
    with pytest.raises(ValueError, match="write_token takes a bfloat16 cache"):
        amx.write_token(jnp.zeros(shape), token, slots, keys)


@needs_amx
def test_row_gather_matches_take():
    rng = np.random.default_rng()
    table = bf16(rng, (50, 64))
    ids = jnp.asarray([[3, 49], [0, 7], [7, 12]], jnp.int32)
    got = jax.jit(amx.gather_rows)(table, ids)
    assert got.shape == (3, 2, 64) and got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(f64(got), f64(table)[np.asarray(ids)])
    with pytest.raises(ValueError, match="bfloat16 table"):
        amx.gather_rows(table.astype(jnp.float32), ids)


def _logits64(x, w, scale):
    return scale * f64(x) @ f64(w).T


@needs_amx
@pytest.mark.parametrize("rows, vocab", [(32, 32), (64, 288), (96, 544)])
def test_logsumexp_matches_float64(rows, vocab):
    """The log-sum-exp over the vocabulary, kept per row while the logits pass
    through tiles 32 x 32 at a time (one vocabulary block, several, and a count
    that leaves one worker a partial share), against float64 NumPy."""
    rng = np.random.default_rng(rows)
    x, w = bf16(rng, (rows, 64)), bf16(rng, (vocab, 64))
    logits = _logits64(x, w, 0.6)
    top = logits.max(axis=1)
    want = np.log(np.exp(logits - top[:, None]).sum(axis=1)) + top
    np.testing.assert_allclose(f64(amx.logsumexp(x, w, 0.6)), want, rtol=1e-6, atol=2e-6)


@needs_amx
@pytest.mark.parametrize("rows, vocab", [(32, 32), (64, 288), (96, 544)])
def test_softmax_rows_matches_float64(rows, vocab):
    """sum_v softmax(scale * x w^T)[m, v] w[v], with the probabilities rounded to bfloat16 as the kernel does, against float64 NumPy;
    the vocabulary spans one partial 256-row block, or a whole one and a partial."""
    rng = np.random.default_rng(rows + 1)
    x, w = bf16(rng, (rows, 64)), bf16(rng, (vocab, 64))
    logits = _logits64(x, w, 1.3)
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    p = np.asarray(jnp.asarray(np.exp(logits - lse[:, None]), jnp.bfloat16), np.float64)
    got = amx.softmax_rows(x, w, jnp.asarray(lse, jnp.float32), 1.3)
    np.testing.assert_allclose(f64(got), p @ f64(w), rtol=1e-4, atol=1e-5)


@needs_amx
def test_the_log_softmax_calls_refuse_what_is_not_whole_tiles():
    x = jnp.zeros((32, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiples of 32"):
        amx.logsumexp(jnp.zeros((20, 64), jnp.bfloat16), jnp.zeros((64, 64), jnp.bfloat16), 1.0)
    with pytest.raises(ValueError, match="multiples of 32"):
        amx.logsumexp(x, jnp.zeros((40, 64), jnp.bfloat16), 1.0)
    with pytest.raises(ValueError, match=r"x \[M, K\] and w \[V, K\]"):
        amx.logsumexp(x, jnp.zeros((64, 32), jnp.bfloat16), 1.0)
    with pytest.raises(ValueError, match="lse"):
        amx.softmax_rows(x, jnp.zeros((64, 64), jnp.bfloat16), jnp.zeros(16), 1.0)


def _log_softmax64(h, e, targets, temperature):
    logits = f64(h) @ f64(e).T / temperature
    top = logits.max(axis=1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return logits[np.arange(len(targets)), targets] - logz, logits, logz


@needs_amx
@pytest.mark.parametrize("n, rows", [(70, 32), (40, 256)])
def test_tied_logprobs_and_gradients_match_float64(n, rows):
    """log softmax(h e^T / T) at the targets, and its gradients to h and to the
    embedding (the last in XLA: the update never asks for it), against float64
    NumPy's formula: d/dh = (g / T) (e[t] - p e), d/de = (g / T) (onehot - p)^T h.
    Row counts that leave a padded chunk, and one chunk larger than the rows."""
    from grpo_jax.model import vocab_parallel

    rng = np.random.default_rng(n)
    h, e = bf16(rng, (n, 64)), jnp.asarray(0.3 * rng.standard_normal((288, 64)), jnp.bfloat16)
    targets = rng.integers(0, 288, n)
    g = rng.standard_normal(n)
    temperature = 0.8
    want, logits, logz = _log_softmax64(h, e, targets, temperature)
    fn = lambda h, e: vocab_parallel.tied_logprobs(h, jnp.asarray(targets, jnp.int32), e,
                                                    temperature, rows)
    np.testing.assert_allclose(f64(fn(h, e)), want, atol=2e-5)

    d_h, d_e = jax.grad(lambda h, e: jnp.sum(jnp.asarray(g, jnp.float32) * fn(h, e)),
                        argnums=(0, 1))(h, e)
    p = np.exp(logits - logz[:, None])
    onehot = np.eye(288)[targets]
    d_logits = (g / temperature)[:, None] * (onehot - p)
    # Results come back in bfloat16 (the operands' dtype): compare at its resolution.
    np.testing.assert_allclose(f64(d_h), d_logits @ f64(e), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(f64(d_e), d_logits.T @ f64(h), rtol=1e-2, atol=1e-2)

    # A float32 caller gets its float32 gradient back (the kernels take bf16 copies).
    d_h32 = jax.grad(lambda h: jnp.sum(fn(h, e)))(h.astype(jnp.float32))
    assert d_h32.dtype == jnp.float32
    np.testing.assert_allclose(f64(d_h32), f64(jax.grad(lambda h: jnp.sum(fn(h, e)))(h)),
                               rtol=1e-2, atol=1e-2)


@needs_amx
def test_teacher_forced_logprobs_on_amx_match_xla_and_keep_the_logits_out_of_memory():
    """The tiny model's per-token log-probs and the LoRA gradient of their sum with
    the AMX log-softmax against XLA's bf16 path; its compiled update holds no
    [rows, V] float32 block."""
    from _tiny_model import random_lora
    from grpo_jax import grpo
    from grpo_jax.model.config import LoraConfig

    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), random_params(TINY, rng))
    lora = random_lora(TINY, LoraConfig(rank=4, alpha=4.0), rng)
    tokens = jnp.asarray(rng.integers(3, TINY.vocab_size, (4, 24)), jnp.int32)
    mask = jnp.ones(tokens.shape, bool)
    on = dataclasses.replace(BF16_TINY, cpu_kernels="amx")

    def run(cfg):
        """(log-probs, LoRA gradient of their sum, compiled HLO), one compile."""
        def loss(lora):
            logp = grpo.per_token_logprobs(params, lora, tokens, mask, 10, cfg, chunk_size=32,
                                           temperature=0.9, group=2)
            return jnp.sum(logp), logp

        compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(lora).compile()
        (_, logp), grads = compiled(lora)
        return logp, grads, compiled.as_text()

    got, g_got, hlo = run(on)
    want, g_want, xla_hlo = run(BF16_TINY)
    np.testing.assert_allclose(f64(got), f64(want), atol=0.05)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        scale = np.abs(f64(b)).max()
        assert np.abs(f64(a) - f64(b)).max() <= 0.05 * scale + 1e-6

    logits_block = re.compile(rf"f32\[[\d,]*,{TINY.vocab_size}\]")
    assert logits_block.search(xla_hlo)  # XLA's path holds them
    assert amx.LOGSUMEXP_TARGET in hlo and amx.SOFTMAX_ROWS_TARGET in hlo
    assert not logits_block.search(hlo), logits_block.search(hlo)
