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


def sampler_drift(params: gemma3.Params, cfg: ModelConfig, rng: np.random.Generator,
                  prompt_lens=(5, 11, 8), new_tokens: int = 12) -> np.ndarray:
    """|sampler log-prob - full forward log-prob| of every token the KV-cached sampler
    draws (temperature 1) for random prompts of `prompt_lens` tokens."""
    from grpo_jax.config import SamplerConfig
    from grpo_jax.sampler import sample_prompts

    prompts = [[2, *rng.integers(3, cfg.vocab_size, size=int(n)).tolist()] for n in prompt_lens]
    out = sample_prompts(params, prompts, jax.random.key(int(rng.integers(1 << 30))), cfg=cfg,
                         sampling=SamplerConfig(max_new_tokens=new_tokens, temperature=1.0,
                                                stop_ids=()))
    forward = jax.jit(gemma3.forward, static_argnums=4)
    drifts = []
    for row, ids in enumerate(prompts):
        n = int(out.lengths[row])
        completion = np.asarray(out.tokens[row, :n]).tolist()
        tokens = jnp.asarray([ids + completion], jnp.int32)
        mask = jnp.ones_like(tokens, bool)
        logits = forward(params, tokens, gemma3.left_padded_positions(mask), mask, cfg)
        full = np.asarray(jax.nn.log_softmax(logits[0], -1))[len(ids) - 1:len(ids) - 1 + n]
        drifts.append(np.abs(np.asarray(out.logprobs[row, :n]) - full[np.arange(n), completion]))
    return np.concatenate(drifts)
