"""Hand-rolled LoRA over the Gemma 3 params pytree.

An adapter on a projection w (einsum "x,w->y") is a pair a [w's input axes..., r],
b [r, w's output axes...]; the adapted projection is x@w + scale * (x@a)@b
(`gemma3.project`). b starts at zero, so step 0 is exactly the base model, and
the reference policy is the same base weights with `lora=None`: no second copy.
"""
from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from grpo_jax import sharding
from grpo_jax.model.config import LoraConfig, ModelConfig
from grpo_jax.model import gemma3


@flax.struct.dataclass
class LoraWeights:
    """layers[i][block][name] = {"a": ..., "b": ...} for each adapted projection."""

    layers: list
    scale: float = flax.struct.field(pytree_node=False)


def _split_axes(block: str, name: str, spec: gemma3.ParamSpec) -> tuple[int, int]:
    """How many of w's leading axes are contracted inputs (the rest are outputs)."""
    eq = gemma3.PROJECTIONS[(block, name)]
    x_spec, w_spec = eq.split("->")[0].split(",")
    n_in = sum(c in x_spec for c in w_spec)
    assert w_spec[:n_in] == "".join(c for c in w_spec if c in x_spec), eq
    return n_in, len(spec.shape) - n_in


def _adapter_specs(model_cfg: ModelConfig, projections, rank: int) -> list:
    base = gemma3.param_specs(model_cfg)["layers"]
    out = []
    for layer in base:
        adapters: dict = {}
        for block, name in projections:
            spec = layer[block][name]
            n_in, _ = _split_axes(block, name, spec)
            fan_in = math.prod(spec.shape[:n_in])
            adapters.setdefault(block, {})[name] = {
                "a": gemma3.ParamSpec(spec.shape[:n_in] + (rank,),
                                      spec.logical_axes[:n_in] + ("lora_rank",), fan_in ** -0.5),
                "b": gemma3.ParamSpec((rank,) + spec.shape[n_in:],
                                      ("lora_rank",) + spec.logical_axes[n_in:], None),
            }
        out.append(adapters)
    return out


def lora_specs(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> list:
    """(shape, logical axes) of every adapter leaf, derived from the base specs."""
    return _adapter_specs(model_cfg, lora_cfg.projections, lora_cfg.rank)


def adapter_logical_axes(model_cfg: ModelConfig, lora: LoraWeights) -> list:
    """Logical axes of each leaf of `lora` (arrays or shapes), read from which
    projections it adapts and its rank: what sharding needs, without the LoraConfig."""
    first = lora.layers[0]
    projections = [(block, name) for block, named in first.items() for name in named]
    rank = next(iter(first[projections[0][0]].values()))["a"].shape[-1]
    specs = _adapter_specs(model_cfg, projections, rank)
    return jax.tree.map(lambda s: s.logical_axes, specs,
                        is_leaf=lambda x: isinstance(x, gemma3.ParamSpec))


def lora_shardings(plan: sharding.MeshPlan, model_cfg: ModelConfig, lora: LoraWeights | None):
    """The shardings of adapters `lora` (a LoraWeights of arrays or shapes): each
    factor takes its base weight's logical axes on its side of the rank. None (no
    adapters: the reference policy) has none."""
    if lora is None:
        return None
    return LoraWeights(sharding.tree_shardings(plan, adapter_logical_axes(model_cfg, lora)),
                       lora.scale)


def init_lora(model_cfg: ModelConfig, lora_cfg: LoraConfig, key: jax.Array,
              dtype=jnp.float32) -> LoraWeights:
    """A ~ N(0, 1/fan_in), B = 0: the adapted model equals the base at init."""
    specs, treedef = jax.tree.flatten(lora_specs(model_cfg, lora_cfg),
                                      is_leaf=lambda x: isinstance(x, gemma3.ParamSpec))
    keys = jax.random.split(key, len(specs))
    leaves = [jnp.zeros(s.shape, dtype) if s.init_std is None
              else (s.init_std * jax.random.normal(k, s.shape, jnp.float32)).astype(dtype)
              for s, k in zip(specs, keys)]
    return LoraWeights(jax.tree.unflatten(treedef, leaves), lora_cfg.scale)


def lora_logical_axes(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> list:
    return jax.tree.map(lambda s: s.logical_axes, lora_specs(model_cfg, lora_cfg),
                        is_leaf=lambda x: isinstance(x, gemma3.ParamSpec))


def delta_weight(adapter: dict, scale: float) -> jax.Array:
    """scale * a @ b as a dense weight in w's layout (f32 accumulation)."""
    a, b = adapter["a"], adapter["b"]
    return scale * jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)


def merge(params: gemma3.Params, lora: LoraWeights) -> gemma3.Params:
    """Fold the adapters into the base weights: w + scale * a @ b, in w's dtype."""
    layers = []
    for base_layer, adapters in zip(params["layers"], lora.layers):
        new_layer = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base_layer.items()}
        for block, named in adapters.items():
            for name, adapter in named.items():
                w = base_layer[block][name]
                new_layer[block][name] = (w.astype(jnp.float32)
                                          + delta_weight(adapter, lora.scale)).astype(w.dtype)
        layers.append(new_layer)
    return {**params, "layers": layers}


def num_params(lora: LoraWeights) -> int:
    return sum(x.size for x in jax.tree.leaves(lora))


def abstract_lora(model_cfg: ModelConfig, lora_cfg: LoraConfig, dtype=jnp.float32) -> LoraWeights:
    """The adapters as ShapeDtypeStructs (for eval_shape and memory accounting)."""
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)),
                          lora_specs(model_cfg, lora_cfg),
                          is_leaf=lambda x: isinstance(x, gemma3.ParamSpec))
    return LoraWeights(shapes, lora_cfg.scale)


def num_bytes(tree) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf in a pytree."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
