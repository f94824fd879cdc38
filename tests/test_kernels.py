"""Pallas TPU kernels in interpret mode against the plain-JAX reference
(`kernels.reference`), on fresh random inputs each run: flash attention's outputs
and gradients, decode attention's outputs; and the block-skipping bounds against a
brute-force count of visible pairs per block."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.kernels import flash_attention as fa
from grpo_jax.kernels import reference
from grpo_jax.kernels.decode_attention import decode_attention
from grpo_jax.kernels.layout import PAD, Layout, packed_layout, self_layout, visible

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def rel_err(got, want) -> float:
    """max |got - want| / max |want|, in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _rng():
    seed = np.random.SeedSequence().entropy % (1 << 32)
    print("seed", seed)  # shown on failure
    return np.random.default_rng(seed)


def left_padded(rng, batch: int, length: int, max_pad: int):
    pads = rng.integers(0, max_pad + 1, size=batch)
    pads[0] = 0
    valid = np.arange(length)[None, :] >= pads[:, None]
    positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
    return jnp.asarray(positions, jnp.int32), jnp.asarray(valid)


def packed(rng, batch: int, prefix: int, group: int, steps: int):
    """[prompt (left-padded) | group completions (each right-padded)]."""
    prompt_pos, prompt_valid = left_padded(rng, batch, prefix, prefix // 2)
    lengths = np.asarray(prompt_valid).sum(1)
    done = rng.integers(1, steps + 1, size=(batch, group))  # real tokens per completion
    comp_valid = np.arange(steps)[None, None, :] < done[:, :, None]
    comp_pos = np.broadcast_to(lengths[:, None, None] + np.arange(steps), (batch, group, steps))
    positions = np.concatenate([prompt_pos, comp_pos.reshape(batch, -1)], 1)
    valid = np.concatenate([prompt_valid, comp_valid.reshape(batch, -1)], 1)
    return packed_layout(jnp.asarray(positions, jnp.int32), jnp.asarray(valid), prefix, group)


# name: (batch, heads, kv heads, head dim, layout maker, block_q, block_kv, window)
CASES = {
    "block-multiples": (2, 4, 1, 16, lambda r: self_layout(*left_padded(r, 2, 32, 0)), 16, 16,
                        None),
    "ragged-left-padded-window": (3, 4, 2, 16, lambda r: self_layout(*left_padded(r, 3, 37, 9)),
                                  16, 16, 8),
    "packed-prompts-window": (2, 2, 1, 32, lambda r: packed(r, 2, 11, 3, 9), 8, 16, 6),
    "packed-prompts-global": (2, 4, 2, 16, lambda r: packed(r, 2, 12, 2, 10), 16, 8, None),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_flash_attention_matches_reference(case, dtype):
    batch, heads, kv_heads, head_dim, make_layout, block_q, block_kv, window = CASES[case]
    rng = _rng()
    layout = make_layout(rng)
    length = layout.q_positions.shape[1]
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    q, k, v = (draw(batch, length, heads, head_dim), draw(batch, length, kv_heads, head_dim),
               draw(batch, length, kv_heads, head_dim))
    cotangent = draw(batch, length, heads, head_dim)
    scale = head_dim ** -0.5

    def kernel(q, k, v):
        return fa.flash_attention(q, k, v, layout, scale=scale, window=window,
                                  block_q=block_q, block_kv=block_kv)

    def ref(q, k, v):  # float32 on the same (rounded) inputs
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        return reference.attention(f32(q), f32(k), f32(v), layout, scale=scale, window=window)

    out, vjp = jax.vjp(kernel, q, k, v)
    want, ref_vjp = jax.vjp(ref, q, k, v)
    assert out.dtype == dtype
    assert rel_err(out, want) <= TOL[dtype]
    # Padding queries see nothing and come out as zeros, in both.
    pad = np.asarray(layout.q_segments) == PAD
    assert np.all(np.asarray(out, np.float32)[pad] == 0)
    grads = vjp(cotangent)
    ref_grads = ref_vjp(cotangent.astype(jnp.float32))
    for name, got, exp in zip("qkv", grads, ref_grads):
        assert got.dtype == dtype, name
        assert rel_err(got, exp) <= TOL[dtype], name


def test_flash_attention_xla_split_path_equals_dense():
    """The XLA implementation's per-completion split of packed rows is the same
    attention as the dense mask over the whole packed row."""
    rng = _rng()
    layout = packed(rng, 2, 9, 3, 6)
    q = jnp.asarray(rng.standard_normal((2, 27, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 27, 2, 8)), jnp.float32) for _ in range(2))
    for window in (None, 5):
        dense = reference.attention(q, k, v, layout, scale=0.3, window=window)
        split = reference.prefix_attention(q, k, v, layout, scale=0.3, window=window)
        assert rel_err(split, dense) <= 1e-6


def _brute_force_meet(layout: Layout, block_q: int, block_kv: int, window):
    """[B, nq, nk]: does any pair of a block pair see each other (from the dense mask)?"""
    mask = np.asarray(reference.dense_mask(layout, window))
    b, t, s = mask.shape
    nq, nk = -(-t // block_q), -(-s // block_kv)
    mask = np.pad(mask, ((0, 0), (0, nq * block_q - t), (0, nk * block_kv - s)))
    return mask.reshape(b, nq, block_q, nk, block_kv).any(axis=(2, 4))


def _kernel_meet(layout: Layout, block_q: int, block_kv: int, window):
    def stats(pos, seg, block):
        pad = -pos.shape[1] % block
        return fa._block_stats(jnp.pad(pos, ((0, 0), (0, pad))),
                               jnp.pad(seg, ((0, 0), (0, pad))), block)
    qs = stats(layout.q_positions, layout.q_segments, block_q)
    ks = stats(layout.kv_positions, layout.kv_segments, block_kv)
    return np.asarray(fa._blocks_meet([qs[:, :, None, c] for c in range(4)],
                                      [ks[:, None, :, c] for c in range(4)], window))


@pytest.mark.parametrize("window", [None, 8])
def test_block_skipping_never_drops_a_visible_pair(window):
    rng = _rng()
    for layout in (self_layout(*left_padded(rng, 3, 70, 20)), packed(rng, 3, 16, 4, 12)):
        want = _brute_force_meet(layout, 8, 8, window)
        got = _kernel_meet(layout, 8, 8, window)
        assert not np.any(want & ~got)  # every block with a visible pair is computed
    # Contiguous rows: the bounds are exact, so the skipped blocks are all of the
    # unneeded ones: those after the diagonal and, with a window, before it.
    layout = self_layout(*left_padded(rng, 2, 64, 0))
    got = _kernel_meet(layout, 8, 8, window)
    np.testing.assert_array_equal(got, _brute_force_meet(layout, 8, 8, window))
    # 8 blocks a row: causal computes 8 * 9 / 2 of 64 pairs, a window of one block 8 + 7.
    assert got[0].sum() == (36 if window is None else 15)


def test_block_skipping_packed_completions_skip_each_other():
    """Blocks of one completion's queries against another completion's keys are skipped."""
    rng = _rng()
    prefix, group, steps = 8, 3, 16
    layout = packed(rng, 1, prefix, group, steps)
    got = _kernel_meet(layout, 8, 8, None)[0]
    blocks = steps // 8
    for g in range(group):
        for h in range(group):
            rows = slice(1 + g * blocks, 1 + (g + 1) * blocks)
            cols = slice(1 + h * blocks, 1 + (h + 1) * blocks)
            if g != h:
                assert not got[rows, cols].any()


# --- decode -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads, kv_heads, size, window, block", [
    (4, 1, 40, None, 16),    # global cache, 40 slots in blocks of 16 (a partial last block)
    (4, 2, 24, 24, 8),       # ring buffer of a window layer, block multiple
    (2, 1, 17, 17, 128),     # ring buffer shorter than one block
])
def test_decode_attention_matches_reference(heads, kv_heads, size, window, block, dtype):
    rng = _rng()
    batch, head_dim = 5, 16
    # Rows at varied positions: fresh, partly filled, exactly full, wrapped around.
    positions = jnp.asarray([0, size // 3, size - 1, size, 3 * size + 5][:batch], jnp.int32)
    if window is None:  # a global cache holds every position
        positions = jnp.minimum(positions, size - 1)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    q = draw(batch, heads, head_dim)
    keys, values = draw(batch, kv_heads, head_dim, size), draw(batch, kv_heads, size, head_dim)
    got = decode_attention(q, keys, values, jnp.minimum(positions + 1, size), scale=0.25,
                           block_kv=block)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = reference.decode_attention(f32(q), f32(keys), f32(values), positions, scale=0.25,
                                      window=window)
    assert got.dtype == dtype
    assert rel_err(got, want) <= TOL[dtype]


def test_decode_attention_ignores_slots_past_the_valid_range():
    """Garbage (even NaN) in slots a row may not see changes nothing."""
    rng = _rng()
    q = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((2, 1, 8, 20)), jnp.float32)
    values = jnp.asarray(rng.standard_normal((2, 1, 20, 8)), jnp.float32)
    lengths = jnp.asarray([5, 13], jnp.int32)
    clean = decode_attention(q, keys, values, lengths, scale=0.3, block_kv=8)
    poisoned = decode_attention(q, keys.at[:, :, :, 13:].set(jnp.nan),
                                values.at[:, :, 13:].set(jnp.nan).at[0, :, 5:].set(1e9),
                                lengths, scale=0.3, block_kv=8)
    np.testing.assert_array_equal(np.asarray(clean), np.asarray(poisoned))


def test_layout_rule():
    """The contract's rule on hand-made cases."""
    cases = [  # q_pos, q_seg, kv_pos, kv_seg, window, visible
        (3, 1, 3, 1, None, True), (3, 1, 4, 1, None, False), (9, 1, 0, 1, None, True),
        (9, 1, 0, 1, 9, False), (9, 1, 1, 1, 9, True), (5, 2, 2, 1, None, True),
        (5, 2, 4, 3, None, False), (5, 2, 4, 2, None, True), (2, 1, 1, 2, None, False),
        (2, 0, 1, 1, None, False), (2, 1, 1, 0, None, False)]
    for q_pos, q_seg, kv_pos, kv_seg, window, want in cases:
        assert bool(visible(q_pos, q_seg, kv_pos, kv_seg, window)) == want


def test_bad_shapes_raise():
    q = jnp.zeros((1, 8, 3, 16))
    kv = jnp.zeros((1, 8, 2, 16))
    layout = self_layout(*left_padded(np.random.default_rng(0), 1, 8, 0))
    with pytest.raises(ValueError, match="query heads"):
        fa.flash_attention(q, kv, kv, layout, scale=1.0)
    with pytest.raises(ValueError, match="packed rows"):
        packed_layout(jnp.zeros((1, 10), jnp.int32), jnp.ones((1, 10), bool), 3, 2)


# --- compiled for a TPU -------------------------------------------------------------

@pytest.mark.xdist_group("tpu-compile")
def test_kernels_compile_for_tpu_v5e():
    """Mosaic lowers both kernels (forward and backward of flash attention) at Gemma 3
    1B's shapes in bfloat16 for one v5e chip (libtpu's compile-only devices): lengths
    that are not block multiples, the sliding window, packed prompts, a ragged cache."""
    pytest.importorskip("libtpu")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from grpo_jax.dry_run import topology_devices
    devices, _ = topology_devices("v5e:2x4")
    mesh = Mesh(np.asarray(devices[:1]), ("x",))
    whole = NamedSharding(mesh, P())
    arg = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=whole)  # noqa: E731
    batch, heads, head_dim = 2, 4, 256

    def train_loss(q, k, v, positions, valid, window, shared_prefix):
        layout = (self_layout(positions, valid) if shared_prefix is None
                  else packed_layout(positions, valid, *shared_prefix))
        out = fa.flash_attention(q, k, v, layout, scale=head_dim ** -0.5, window=window)
        return jnp.sum(out.astype(jnp.float32))

    with jax.set_mesh(mesh):
        for length, window, shared_prefix in ((1000, 512, None), (256 + 4 * 300, 512, (256, 4)),
                                              (384, None, None)):
            args = (arg((batch, length, heads, head_dim)), arg((batch, length, 1, head_dim)),
                    arg((batch, length, 1, head_dim)), arg((batch, length), jnp.int32),
                    arg((batch, length), jnp.bool_))
            step = jax.jit(jax.grad(train_loss, argnums=(0, 1, 2)), static_argnums=(5, 6))
            compiled = step.lower(*args, window, shared_prefix).compile()
            assert "tpu_custom_call" in compiled.as_text()
        for size in (512, 1100):  # a window layer's ring, a global cache (partial block)
            decode = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, scale=0.0625))
            compiled = decode.lower(arg((16, heads, head_dim)), arg((16, 1, head_dim, size)),
                                    arg((16, 1, size, head_dim)), arg((16,), jnp.int32)).compile()
            assert "tpu_custom_call" in compiled.as_text()


@pytest.mark.xdist_group("tpu-compile")
def test_attention_benchmark_runs_and_checks():
    """benchmarks/attention.py at one small shape: the interpret-mode check agrees with
    the reference and the compiled v5e figures come back (libtpu), or it says why not."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import attention as bench

    result = bench.run(bench.Args(shapes=("2x256",), layers=("local",), modes=("train",),
                                  impls=("xla", "pallas")))
    assert set(result["check_rel_err"]) == {"pallas/local", "pallas/global"}
    assert all(err <= 1e-5 for errs in result["check_rel_err"].values() for err in errs.values())
    assert "mean nothing" in result["timings"]
    with pytest.raises(ValueError, match="BATCHxLENGTH"):
        bench.run(bench.Args(shapes=("big",), check=False))
    try:
        import libtpu  # noqa: F401
    except ImportError:
        assert "no libtpu" in result["compiled"]
        return
    xla, pallas = result["rows"]
    assert xla["impl"] == "xla" and pallas["impl"] == "pallas" and "error" not in pallas
    assert pallas["flops"] > 0 and pallas["schedule"]["flops"] > 0 and "schedule" not in xla
