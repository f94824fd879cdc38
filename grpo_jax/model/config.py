"""The model's configuration: the Gemma 3 decoder architecture (`ModelConfig`), LoRA's
(`LoraConfig`), and the architecture presets. Every architecture number lives here,
once; the model, the loaders and the tests read it from a `ModelConfig`."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from grpo_jax.validation import validated

ATTENTION_IMPLS = ("xla", "pallas")
DTYPES = ("float32", "bfloat16", "float16")
# What a run may ask for: a dtype, or "auto" (grpo_jax.model.dtype_choice: measured).
DTYPE_CHOICES = ("auto", *DTYPES)
# How the model's matmuls run (grpo_jax/model/matmul.py): XLA's dot, or oneDNN's
# bfloat16 matmul as a custom call (grpo_jax/kernels/cpu/: AMX on Intel CPUs that have
# it, where XLA:CPU reaches it only in part). "auto": what `--dtype auto`'s probe picks.
MATMUL_IMPLS = ("xla", "onednn")
MATMUL_CHOICES = ("auto", *MATMUL_IMPLS)
# Whose kernels run the decode loop and the teacher-forced log-softmax: XLA's, or
# custom calls on AMX tiles (grpo_jax/kernels/cpu/amx.py; bfloat16 on Intel CPUs with
# AMX, one device).
CPU_KERNELS = ("xla", "amx")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Gemma 3 decoder architecture (text only)."""

    name: str
    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffw_dim: int
    sliding_window: int
    # Every `global_every`-th layer (1-based) attends globally, the rest locally.
    global_every: int = 6
    rope_base_local: float = 10_000.0
    rope_base_global: float = 1_000_000.0
    # Linear RoPE position scaling on global layers (4B and larger use 8).
    rope_scale_global: float = 1.0
    # Queries are scaled by query_pre_attn_scalar ** -0.5.
    query_pre_attn_scalar: float = 256.0
    rms_eps: float = 1e-6
    # Compute dtype. float32 by default; bfloat16 on accelerators and on CPUs with
    # AVX-512 BF16 (measured ~1.8x float32 there). On AVX2-only and AMX CPUs XLA:CPU's
    # bfloat16 was measured at or below float32 before the float32-summing matmul
    # (model/matmul.py); with jax 0.10 on an AMX CPU it is ~4x float32 (docs/perf/).
    # A run's "auto" measures (grpo_jax/model/dtype_choice.py).
    dtype: str = "float32"
    # Storage dtype of the weights.
    param_dtype: str = "float32"
    # Attention: "xla" (dense masked einsums) or "pallas" (grpo_jax/kernels/: flash attention for
    # the forward and backward, decode attention for the sampler; TPU interpret mode
    # off a TPU, so only for tests there).
    attention_impl: str = "xla"
    # The matmuls' implementation, of MATMUL_IMPLS; "onednn" applies to bfloat16
    # compute (other dtypes, and einsums with a batch axis, keep XLA's).
    matmul_impl: str = "xla"
    # Hand-written CPU kernels, of CPU_KERNELS: "amx" runs the decode loop's
    # projections, logits, cache writes and embedding reads, and the teacher-forced
    # log-softmax over the vocabulary, on AMX tiles (grpo_jax/kernels/cpu/amx.py), in
    # bfloat16 on one device; set by `load.with_dtype` where the kernels run.
    cpu_kernels: str = "xla"

    @validated
    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for field in ("vocab_size", "embed_dim", "num_layers", "num_heads", "head_dim",
                      "ffw_dim", "sliding_window", "global_every"):
            if getattr(self, field) <= 0:
                raise ValueError(f"ModelConfig.{field} must be positive, got {getattr(self, field)}")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"ModelConfig.{field} must be one of {', '.join(DTYPES)}")
        if self.matmul_impl not in MATMUL_IMPLS:
            raise ValueError(f"matmul implementation {self.matmul_impl!r}: choose one of "
                             f"{', '.join(MATMUL_IMPLS)}")
        if self.cpu_kernels not in CPU_KERNELS:
            raise ValueError(f"CPU kernels {self.cpu_kernels!r}: choose one of "
                             f"{', '.join(CPU_KERNELS)}")
        if self.cpu_kernels == "amx" and self.dtype != "bfloat16":
            raise ValueError(f"the AMX kernels compute in bfloat16, not {self.dtype}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention implementation {self.attention_impl!r}: choose one of "
                             f"{', '.join(ATTENTION_IMPLS)}")

    def is_global_layer(self, layer: int) -> bool:
        return (layer + 1) % self.global_every == 0

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)


# LoRA target names -> the projections they adapt ("kv" adapts keys and values).
LORA_TARGETS: dict[str, tuple[tuple[str, str], ...]] = {
    "q": (("attn", "q"),),
    "kv": (("attn", "k"), ("attn", "v")),
    "o": (("attn", "o"),),
    "gate": (("mlp", "gate"),),
    "up": (("mlp", "up"),),
    "down": (("mlp", "down"),),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the base projections: W x + (alpha / rank) * B(A x)."""

    rank: int = 16
    """Adapter rank r."""
    alpha: float = 16.0
    """Scale numerator: the adapter output is multiplied by alpha / rank."""
    targets: tuple[str, ...] = ("q", "kv", "o", "gate", "up", "down")
    """Projections to adapt: any of q, kv, o, gate, up, down."""

    @validated
    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"LoraConfig.rank must be positive, got {self.rank}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {list(self.targets)} invalid; choose from "
                             f"{', '.join(LORA_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def projections(self) -> tuple[tuple[str, str], ...]:
        return tuple(p for t in self.targets for p in LORA_TARGETS[t])


GEMMA3_270M = ModelConfig(
    name="gemma3-270m", vocab_size=262_144, embed_dim=640, num_layers=18, num_heads=4,
    num_kv_heads=1, head_dim=256, ffw_dim=2048, sliding_window=512)

GEMMA3_1B = ModelConfig(
    name="gemma3-1b", vocab_size=262_144, embed_dim=1152, num_layers=26, num_heads=4,
    num_kv_heads=1, head_dim=256, ffw_dim=6912, sliding_window=512)

GEMMA3_4B = ModelConfig(
    name="gemma3-4b", vocab_size=262_208, embed_dim=2560, num_layers=34, num_heads=8,
    num_kv_heads=4, head_dim=256, ffw_dim=10_240, sliding_window=1024, rope_scale_global=8.0)

# A random tiny Gemma for tests: small window so short prompts cross it.
TINY = ModelConfig(
    name="tiny", vocab_size=512, embed_dim=64, num_layers=4, num_heads=4, num_kv_heads=2,
    head_dim=16, ffw_dim=128, sliding_window=4, global_every=2, query_pre_attn_scalar=16.0)

MODEL_PRESETS: dict[str, ModelConfig] = {
    c.name: c for c in (GEMMA3_270M, GEMMA3_1B, GEMMA3_4B, TINY)}


def model_preset(name: str) -> ModelConfig:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; choose one of: {', '.join(MODEL_PRESETS)}") from None
