"""Random tiny-Gemma weights and LoRA adapters drawn with NumPy (no per-leaf XLA
compiles, so fixtures take milliseconds), shared by test_grpo and test_lora."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.model.config import LoraConfig, ModelConfig
from grpo_jax.model import gemma3, lora as lora_lib


def _is_spec(x) -> bool:
    return isinstance(x, gemma3.ParamSpec)


def random_params(cfg: ModelConfig, rng: np.random.Generator) -> gemma3.Params:
    """Like gemma3.init_params: N(0, init_std), norm scales N(0, 0.1) so they matter."""
    def one(spec):
        std = 0.1 if spec.init_std is None else spec.init_std
        return jnp.asarray(std * rng.standard_normal(spec.shape), jnp.float32)
    return jax.tree.map(one, gemma3.param_specs(cfg), is_leaf=_is_spec)


def random_lora(cfg: ModelConfig, lora_cfg: LoraConfig, rng: np.random.Generator,
                b_std: float = 0.05) -> lora_lib.LoraWeights:
    """Adapters with A ~ N(0, 1/fan_in) and a non-zero B, so they change the output."""
    def one(spec):
        std = b_std if spec.init_std is None else spec.init_std
        return jnp.asarray(std * rng.standard_normal(spec.shape), jnp.float32)
    layers = jax.tree.map(one, lora_lib.lora_specs(cfg, lora_cfg), is_leaf=_is_spec)
    return lora_lib.LoraWeights(layers, lora_cfg.scale)
