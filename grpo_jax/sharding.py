"""Device mesh and the one table that says how every array is laid out on it.

Mesh axes: `data` (batch rows; parameters replicated), `fsdp` (batch rows too, and
parameters sharded on their embedding axis, gathered per layer by the compiler) and
`tensor` (query heads, MLP hidden units and the vocabulary). `LOGICAL_RULES` maps the
logical axis names of `gemma3.param_specs` (and LoRA's, the cache's, the batch's) to
mesh axes; `MeshPlan.spec` turns a tuple of logical names into a PartitionSpec.

Sharding mode: auto axes (`AxisType.Auto`). The jitted programs get explicit in/out
shardings from this table and the compiler (GSPMD/Shardy) propagates them through the
model, with a few `with_sharding_constraint`s on activations (`constrain`). Explicit
axes would make every einsum of the model state its output sharding whenever both
operands are sharded on the same mesh axis (fsdp on the batch of the activations and
the embedding axis of the weights), i.e. sharding logic in the model code; auto axes
keep the model free of it and let single-device runs trace the same code.

Gemma 3 has one KV head: `kv_heads` is never split (the KV projections and cache are
replicated over `tensor`, the cache is sharded on its batch rows).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from grpo_jax.config import MeshConfig
from grpo_jax.model.config import ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (or axes, or None: replicated). Every logical name used by
# a parameter, adapter, cache or batch array must be here (`MeshPlan.spec` refuses
# unknown names, so a new weight cannot silently go unsharded).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": None,    # one KV head in Gemma 3 1B / 270M: never split
    "head_dim": None,
    "ffw": "tensor",
    "lora_rank": None,
    "length": None,      # sequence / cache slots / generated tokens
}


class ShardingError(ValueError):
    """A mesh, batch or model shape that the mesh cannot divide."""


def initialize_distributed(dist) -> None:
    """`jax.distributed.initialize` from a DistributedConfig, its unset fields from
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; nothing without a
    coordinator (one process). Must run before anything touches a device."""
    if jax.distributed.is_initialized():
        return
    if dist.auto:
        jax.distributed.initialize()
        return
    env = os.environ.get
    coordinator = dist.coordinator or env("JAX_COORDINATOR_ADDRESS")
    if not coordinator:
        return
    count = dist.num_processes if dist.num_processes is not None else env("JAX_NUM_PROCESSES")
    index = dist.process_id if dist.process_id is not None else env("JAX_PROCESS_ID")
    if count is None or index is None:
        raise ValueError(f"coordinator {coordinator} given without --distributed.num-processes "
                         "and --distributed.process-id (or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    jax.distributed.initialize(coordinator, int(count), int(index))


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with auto axes over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    mesh_cfg.check_devices(len(devices))
    return jax.make_mesh((mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor), MESH_AXES,
                         axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_spec(logical: Sequence[str | None]) -> P:
    """PartitionSpec of an array whose axes have these logical names. A mesh axis
    already used by an earlier array axis is not used again (replicated there)."""
    used, out = set(), []
    for name in logical:
        if name is None:
            out.append(None)
            continue
        if name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no sharding rule")
        axes = LOGICAL_RULES[name]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


@dataclasses.dataclass(frozen=True)
class MeshPlan:
    """A mesh, read through `LOGICAL_RULES`. Hashable, so the jitted programs built
    for it are cached per plan."""

    mesh: Mesh

    def spec(self, logical: Sequence[str | None]) -> P:
        return logical_spec(logical)

    def sharding(self, logical: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def config(self) -> MeshConfig:
        shape = self.mesh.shape
        return MeshConfig(shape["data"], shape["fsdp"], shape["tensor"])

    @property
    def row_devices(self) -> int:
        """How many ways batch rows are split (data x fsdp)."""
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    @property
    def rows(self) -> NamedSharding:
        """Leading axis over data x fsdp, the rest replicated: a prefix for any batch
        array (tokens, masks, advantages, log-probs, sampled records)."""
        return self.sharding(("batch",))


def plan_for(mesh_cfg: MeshConfig, devices: Sequence | None = None) -> MeshPlan:
    return MeshPlan(make_mesh(mesh_cfg, devices))


@functools.lru_cache(maxsize=1)
def local_plan() -> MeshPlan:
    """The 1 x 1 x 1 mesh of this process's first device: what every program runs on
    when no mesh is asked for (it traces the plain single-device program)."""
    return plan_for(MeshConfig(), jax.local_devices()[:1])


# ---------------------------------------------------------------------------
# Checks that refuse, in one line, before anything compiles


def check_model(mesh_cfg: MeshConfig, cfg: ModelConfig) -> None:
    """`tensor` must divide the query heads, MLP width and vocabulary; `fsdp` the
    embedding width (the KV heads are never split)."""
    t = mesh_cfg.tensor
    for what, n in (("query heads", cfg.num_heads), ("ffw_dim", cfg.ffw_dim),
                    ("vocab_size", cfg.vocab_size)):
        if n % t:
            raise ShardingError(f"--mesh.tensor {t} does not divide {cfg.name}'s {n} {what}")
    if cfg.embed_dim % mesh_cfg.fsdp:
        raise ShardingError(f"--mesh.fsdp {mesh_cfg.fsdp} does not divide {cfg.name}'s "
                            f"embed_dim {cfg.embed_dim}")


def check_rows(mesh_cfg: MeshConfig, rows: int, what: str) -> None:
    divisor = mesh_cfg.data * mesh_cfg.fsdp
    if rows % divisor:
        raise ShardingError(f"{what} of {rows} rows does not divide over --mesh.data "
                            f"{mesh_cfg.data} x --mesh.fsdp {mesh_cfg.fsdp} = {divisor} devices")


def check_run(cfg, model_cfg: ModelConfig, devices: int) -> None:
    """Every shape a TrainConfig's programs take must divide over its mesh: one line
    each, before anything loads or compiles."""
    mesh, g = cfg.mesh, cfg.grpo
    mesh.check_devices(devices)
    check_model(mesh, model_cfg)
    check_rows(mesh, g.num_prompts, "--grpo.num-prompts (prompts prefilled)")
    check_rows(mesh, g.batch_size, "the GRPO batch")
    micro = g.micro_batch or g.batch_size
    unit = g.packing_group(micro)
    check_rows(mesh, micro // unit, "a GRPO micro-batch" + (
        f" (packed: {unit} completions a row)" if unit > 1 else ""))
    if cfg.sft.steps:
        check_rows(mesh, cfg.sft.batch_size, "--sft.batch-size")


# ---------------------------------------------------------------------------
# Sharding trees (each pytree's owner supplies its logical axes: gemma3.param_shardings,
# lora.lora_shardings, kv_cache.cache_shardings)


def is_axes(x) -> bool:
    """A leaf of a logical-axes tree: a tuple of axis names (or None)."""
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(plan: MeshPlan, axes_tree) -> Any:
    """NamedShardings for a tree whose leaves are logical-axes tuples."""
    return jax.tree.map(plan.sharding, axes_tree, is_leaf=is_axes)


def opt_state_shardings(plan: MeshPlan, optimizer: optax.GradientTransformation,
                        lora, lora_sharding):
    """The optimizer state laid out like the adapters it mirrors (Adam's moments);
    counters and other non-parameter leaves replicated."""
    abstract = jax.eval_shape(optimizer.init, lora)
    return optax.tree_map_params(optimizer, lambda _, s: s, abstract, lora_sharding,
                                 transform_non_params=lambda _: plan.replicated,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))


# ---------------------------------------------------------------------------
# Placement


def put(x, sharding: NamedSharding) -> jax.Array:
    """A host array every process holds whole (weights, adapters) -> a global array
    with `sharding`; each process fills only its own devices' shards."""
    if isinstance(x, jax.Array):
        return jax.device_put(x, sharding)  # a local or a global array: resharded
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_tree(tree, shardings):
    return jax.tree.map(put, tree, shardings)


def put_rows(plan: MeshPlan, local_rows, global_rows: int | None = None) -> jax.Array:
    """This process's rows of a batch array -> the global array sharded over data x
    fsdp. Each host feeds its own rows (`process_rows`); in one process they are all."""
    local_rows = np.asarray(local_rows)
    global_shape = None
    if global_rows is not None:
        global_shape = (global_rows, *local_rows.shape[1:])
    return jax.make_array_from_process_local_data(plan.rows, local_rows, global_shape)


def put_batch(plan: MeshPlan, tree):
    """A batch pytree held whole on every host (each computes the same rollout and
    rewards) -> global arrays with rows over data x fsdp, each process feeding only
    its own rows (`process_rows`)."""

    def one(x):
        x = np.asarray(x)
        return put_rows(plan, x[process_rows(x.shape[0])], x.shape[0])

    return jax.tree.map(one, tree)


def to_host(tree):
    """Arrays -> NumPy on every process; arrays spread over other hosts' devices are
    gathered (a collective: every process must call it)."""
    leaves = jax.tree.leaves(tree)
    if all(getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False)
           for x in leaves):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


def process_rows(rows: int) -> slice:
    """The slice of `rows` batch rows this process feeds (contiguous, equal shares)."""
    n, i = jax.process_count(), jax.process_index()
    if rows % n:
        raise ShardingError(f"a batch of {rows} rows does not divide over {n} processes")
    share = rows // n
    return slice(i * share, (i + 1) * share)


# ---------------------------------------------------------------------------
# Inside traced code


def active_mesh():
    """The mesh set by `jax.set_mesh` around the current trace when it spans more than
    one device, else None: on one device (`local_plan`) the model traces its plain
    program, with no sharding constraints or shard_maps to lower."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def constrain(x: jax.Array, logical: Sequence[str | None] = ("batch",)) -> jax.Array:
    """Pin an activation's layout (default: rows over data x fsdp) when traced under a
    mesh; the identity on a single device."""
    mesh = active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(logical))


def per_device(fn: Callable, in_specs, out_specs, **kwargs) -> Callable:
    """`fn` run per device under `jax.shard_map` on the mesh around the trace, or
    `fn` itself on a single device (no mesh): the one place that branch lives."""
    if active_mesh() is None:
        return fn
    return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, **kwargs)


class ShardedJit:
    """`jax.jit(fn)` with explicit in/out shardings, traced and run under the plan's
    mesh. `shardings_of(*args) -> (in_shardings, out_shardings)` reads the arguments'
    structure, so a program is built per structure: an optional argument that is None
    (no adapters for the reference pass, no stop strings) gets its own. `lower` takes
    ShapeDtypeStructs, for compiling without data (the dry run)."""

    def __init__(self, plan: MeshPlan, fn: Callable, shardings_of: Callable, *,
                 static_argnums: tuple[int, ...] = (), donate_argnums: tuple[int, ...] = ()):
        self.plan, self.fn, self.shardings_of = plan, fn, shardings_of
        self.static_argnums, self.donate_argnums = static_argnums, donate_argnums
        self._programs: dict = {}

    def _program(self, args):
        dynamic = [a for i, a in enumerate(args) if i not in self.static_argnums]
        key = jax.tree.structure(dynamic)
        if key not in self._programs:
            in_sh, out_sh = self.shardings_of(*args)
            self._programs[key] = jax.jit(
                self.fn, in_shardings=in_sh, out_shardings=out_sh,
                static_argnums=self.static_argnums, donate_argnums=self.donate_argnums)
        return self._programs[key]

    def __call__(self, *args):
        program = self._program(args)
        with jax.set_mesh(self.plan.mesh):
            return program(*args)

    def lower(self, *args):
        program = self._program(args)
        with jax.set_mesh(self.plan.mesh):
            return program.lower(*args)


def sharded_jit(plan: MeshPlan, fn: Callable, shardings_of: Callable, **kwargs) -> ShardedJit:
    return ShardedJit(plan, fn, shardings_of, **kwargs)
