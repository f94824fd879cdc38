"""Where a Pallas TPU kernel runs: compiled through Mosaic when the program is built
for TPU devices, in Pallas's TPU interpret mode everywhere else (CPU tests).

The target is read from the mesh around the trace (`jax.set_mesh`: the dry run
builds programs for compile-only TPU devices from a CPU host), else the default
backend.
"""
from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu


def target_platform() -> str:
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh.abstract_device.platform
    return jax.default_backend()


def interpret_params(interpret: bool | None):
    """`interpret=` for `pl.pallas_call`: None decides by the target platform."""
    if interpret is None:
        interpret = target_platform() != "tpu"
    return pltpu.InterpretParams() if interpret else False


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
