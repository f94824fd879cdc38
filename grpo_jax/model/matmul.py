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
any other dtype, stay with XLA."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from grpo_jax.kernels.cpu import onednn


def matmul(equation: str, x: jax.Array, w: jax.Array, dtype, out_dtype=None,
           impl: str = "xla") -> jax.Array:
    """einsum(equation, x, w) with both operands in `dtype`, summed in float32,
    returned in `out_dtype` (default `dtype`), by `impl` (xla or onednn)."""
    dtype = jnp.dtype(dtype)
    y = None
    if impl == "onednn" and dtype == jnp.bfloat16:
        y = onednn.einsum(equation, x.astype(dtype), w.astype(dtype))
    if y is None:
        y = jnp.einsum(equation, x.astype(dtype), w.astype(dtype),
                       preferred_element_type=jnp.float32)
    return y.astype(out_dtype or dtype)
