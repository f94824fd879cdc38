"""Sharded over a device mesh == one device.

The mesh tests run `sharded_worker.py` in a process of its own with 8 simulated CPU
devices (this process has one), once for all four meshes, on fresh random inputs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from grpo_jax import sharding
from grpo_jax.config import MeshConfig
from grpo_jax.model.config import GEMMA3_1B, TINY

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4), (2, 2, 2, "pallas"))
WORKER = Path(__file__).with_name("sharded_worker.py")
pytestmark = pytest.mark.xdist_group("sharded-8-devices")


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    """The 8-device worker's results, computed once per test session: pytest-xdist may
    hand this module's tests to both workers despite their group (3.8 did), and two
    copies of the worker side by side thrash a 2-core, 24 GiB machine. The first
    worker to get here runs it under a file lock in the session's shared temp dir;
    the other reads its results."""
    shared = tmp_path_factory.getbasetemp().parent / "sharded-8-devices"
    shared.mkdir(exist_ok=True)
    out, seed_file = shared / "results.npz", shared / "seed"
    with FileLock(str(shared / "lock")):
        if not out.exists():
            seed = int(np.random.default_rng().integers(1 << 30))
            env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu",
                   "SHARDED_SEED": str(seed)}
            proc = subprocess.run([sys.executable, str(WORKER), str(shared / "partial.npz"),
                                   *(",".join(map(str, m)) for m in MESHES)],
                                  env=env, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, proc.stderr[-4000:]
            seed_file.write_text(str(seed))
            os.replace(shared / "partial.npz", out)
    results = np.load(out)
    return {k: results[k] for k in results.files}, int(seed_file.read_text())


def _mesh_name(mesh) -> str:
    """(2, 2, 2) -> "2x2x2"; (2, 2, 2, "pallas") -> "2x2x2-pallas" (the Pallas kernels)."""
    shape = [m for m in mesh if m != "pallas"]
    return "x".join(map(str, shape)) + ("-pallas" if "pallas" in mesh else "")


def _close(a: np.ndarray, b: np.ndarray, what: str, tol: float = 1e-5) -> None:
    """Equal to float32 rounding: |a - b| <= tol * (|a| + max|a|), relative to each
    element and to the array's scale (sums in another order differ by a few ulps of
    their largest terms). A scalar (the losses) is a mean of O(1) terms that cancel, so
    its scale is |a| + 1: a loss near 0 still carries its terms' rounding."""
    scale = np.abs(a) + (np.max(np.abs(a)) if a.ndim else 1.0)
    bad = np.abs(a - b) > tol * scale
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} differ, worst "
                           f"{np.max(np.abs(a - b))} (max |x| {np.max(np.abs(a))})")


@pytest.mark.parametrize("mesh", MESHES, ids=_mesh_name)
def test_step_reference_and_sampler_match_one_device(sharded_results, mesh):
    results, seed = sharded_results
    name = _mesh_name(mesh)
    keys = sorted(k.split("/", 1)[1] for k in results if k.startswith("single/"))
    assert {"loss", "grad_loss", "ref_logprobs", "sample_tokens", "grad_0", "lora_0"} <= set(keys)
    for key in keys:
        if key == "specs":
            continue
        single, sharded = results[f"single/{key}"], results[f"{name}/{key}"]
        assert single.shape == sharded.shape, key
        if single.dtype.kind in "iub":
            np.testing.assert_array_equal(sharded, single, err_msg=f"{key} (seed {seed})")
        else:
            _close(single, sharded, f"{name} {key} (seed {seed})")


@pytest.mark.parametrize("mesh", MESHES, ids=_mesh_name)
def test_arrays_come_back_with_the_rules_shardings(sharded_results, mesh):
    results, _ = sharded_results
    specs = json.loads(str(results[f"{_mesh_name(mesh)}/specs"]))
    lora = sorted(k for k in specs if k.startswith("lora_"))
    opt = sorted(k for k in specs if k.startswith("opt_"))
    assert lora and opt
    for key in lora:
        assert specs[key] == specs[f"want_{key}"], key
        assert specs[key.replace("lora_", "grad_")] == specs[f"want_{key}"], key
    for key in opt:
        assert specs[key] == specs[f"want_{key}"], key
    assert specs["ref_logprobs"] == specs["sample_tokens"] == specs["want_rows"] \
        == "P(('data', 'fsdp'),)"
    caches = [k for k in specs if k.startswith("cache_keys_")]
    assert caches and all(specs[k] == specs["want_cache"] for k in caches)
    # The single KV head is never split: the cache is sharded on its rows only.
    assert specs["want_cache"] == "P(('data', 'fsdp'), None, None, None)"
    assert specs["cache_lengths"] == specs["want_rows"]


# ---------------------------------------------------------------------------
# The rules table (no devices needed)


def test_every_logical_axis_of_the_model_has_a_rule():
    from grpo_jax.model.config import LoraConfig
    from grpo_jax.model import gemma3, lora as lora_lib

    for cfg in (TINY, GEMMA3_1B):
        axes = jax_leaves(gemma3.logical_axes(cfg)) + jax_leaves(
            lora_lib.lora_logical_axes(cfg, LoraConfig()))
        for logical in axes:
            sharding.logical_spec(logical)  # KeyError on a name without a rule
    with pytest.raises(KeyError, match="no sharding rule"):
        sharding.logical_spec(("batch", "nonsense"))


def jax_leaves(tree) -> list:
    import jax
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, tuple))


def test_rules_give_the_intended_specs():
    spec = sharding.logical_spec
    assert spec(("vocab", "embed")) == sharding.P("tensor", "fsdp")
    assert spec(("embed", "q_heads", "head_dim")) == sharding.P("fsdp", "tensor", None)
    assert spec(("embed", "kv_heads", "head_dim")) == sharding.P("fsdp", None, None)
    assert spec(("batch", None)) == sharding.P(("data", "fsdp"), None)
    # A mesh axis is used once per array: fsdp already holds the rows here.
    assert spec(("batch", "embed")) == sharding.P(("data", "fsdp"), None)


def test_bad_meshes_and_batches_are_one_line_errors():
    with pytest.raises(ValueError, match=r"= 8 devices, but this process has 1$"):
        sharding.make_mesh(MeshConfig(2, 2, 2))
    with pytest.raises(sharding.ShardingError,
                       match="--mesh.tensor 8 does not divide gemma3-1b's 4 query heads"):
        sharding.check_model(MeshConfig(1, 1, 8), GEMMA3_1B)
    with pytest.raises(sharding.ShardingError, match="--mesh.fsdp 5 does not divide"):
        sharding.check_model(MeshConfig(1, 5, 1), GEMMA3_1B)
    sharding.check_model(MeshConfig(1, 2, 4), dataclasses.replace(TINY, num_kv_heads=1))
    with pytest.raises(sharding.ShardingError, match="GRPO batch of 12 rows does not divide "
                       r"over --mesh.data 2 x --mesh.fsdp 4 = 8 devices"):
        sharding.check_rows(MeshConfig(2, 4, 1), 12, "GRPO batch")
