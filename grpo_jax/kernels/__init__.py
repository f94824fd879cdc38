"""Attention kernels.

`kernels.reference.attention` is the plain-JAX attention the model calls; Pallas
kernels (flash prefill, ragged decode) live beside it and are tested against it.
"""
