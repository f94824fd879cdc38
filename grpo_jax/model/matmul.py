"""The model's one matmul: every projection, LoRA path and logits product goes
through `matmul`, so how the model multiplies (dtype, accumulation, a library
kernel) is one switch.

Inputs are cast to the compute dtype and accumulated in float32: in bfloat16 that
is both the more accurate choice and, on XLA:CPU, the fast one. Its bfloat16
matmul with a bfloat16 result runs at float32's rate or below, while one
accumulating into float32 uses AVX-512 BF16 where the CPU has it (~2x float32;
measured in docs/perf/). The result comes back in `out_dtype` (the compute dtype
unless asked: the logits want float32).

`impl="onednn"` runs bfloat16 matmuls through oneDNN (grpo_jax/kernels/cpu/), where
it reaches matrix units XLA:CPU leaves idle; an einsum that is not one matmul, and
any other dtype, stay with XLA. The decode loop's weights, packed once for AMX tiles
(grpo_jax/kernels/cpu/amx.py), always go to that kernel."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from grpo_jax import sharding
from grpo_jax.kernels.cpu import amx, onednn


def matmul(equation: str, x: jax.Array, w: jax.Array | amx.PackedWeight, dtype,
           out_dtype=None, impl: str = "xla") -> jax.Array:
    """einsum(equation, x, w) with both operands in `dtype`, summed in float32,
    returned in `out_dtype` (default `dtype`), by `impl` (xla or onednn); a weight
    packed for AMX tiles (the decode loop's, `amx.PackedWeight`) by the AMX kernel."""
    dtype = jnp.dtype(dtype)
    y = None
    if isinstance(w, amx.PackedWeight):
        if dtype != jnp.bfloat16:
            raise ValueError(f"a weight packed for AMX computes in bfloat16, not {dtype}")
        y = amx.packed_einsum(equation, x, w)
    elif impl == "onednn" and dtype == jnp.bfloat16:
        y = onednn.einsum(equation, x.astype(dtype), w.astype(dtype))
    if y is None:
        x, w = x.astype(dtype), w.astype(dtype)
        if sharding.active_mesh() is None:
            y = _einsum_f32(onednn.expand_ellipsis(equation.replace(" ", ""), x.ndim), x, w)
        else:  # under shard_map the backward's cotangents vary over other mesh axes
            y = jnp.einsum(equation, x, w, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_f32(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum summed in float32, whose backward's matmuls take the cotangent in the
    operands' dtype. Differentiated as is, a float32 cotangent meets a bfloat16
    operand and both backward matmuls run at float32's rate (they were 40% of a
    270M update on an AMX machine, the logits' alone ~550 ms a chunk at 155 GFLOP/s)."""
    return jnp.einsum(equation, x, w, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(equation, x, w):
    return _einsum_f32(equation, x, w), (x, w)


def _einsum_f32_bwd(equation, residuals, g):
    x, w = residuals
    inputs, out = equation.split("->")
    xs, ws = inputs.split(",")
    g = g.astype(x.dtype if x.dtype == w.dtype else jnp.float32)
    dx = jnp.einsum(f"{out},{ws}->{xs}", g, w, preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{xs},{out}->{ws}", x, g, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)
