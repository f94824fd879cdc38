"""grpo_jax: GRPO with hand-rolled LoRA on Gemma 3, in JAX."""

__version__ = "0.1.0"
