"""Memory of the trainable state: LoRA adapters, their gradients and AdamW's moments.

    python benchmarks/lora_memory.py --model gemma3-270m --rank 16

Counted from shapes only (no weights are loaded): the adapters come from
`lora.lora_specs`, the optimizer state from `jax.eval_shape` of optax.adamw's
init on those shapes, so the figure is what optax actually allocates. Prints JSON.
"""
from __future__ import annotations

import argparse
import json

import jax
import optax

from grpo_jax.model.config import LORA_TARGETS, LoraConfig, model_preset
from grpo_jax.model import gemma3, lora


def report(model_name: str = "gemma3-270m", rank: int = 16, alpha: float | None = None,
           targets: tuple[str, ...] = tuple(LORA_TARGETS), dtype: str = "float32") -> dict:
    model_cfg = model_preset(model_name)
    lora_cfg = LoraConfig(rank=rank, alpha=float(rank if alpha is None else alpha),
                          targets=tuple(targets))
    adapters = lora.abstract_lora(model_cfg, lora_cfg, dtype)
    opt_state = jax.eval_shape(optax.adamw(1e-5).init, adapters)
    mib = 2 ** 20
    n = sum(x.size for x in jax.tree.leaves(adapters))
    base = sum(x.size for x in jax.tree.leaves(gemma3.abstract_params(model_cfg)))
    lora_bytes = lora.num_bytes(adapters)
    opt_bytes = lora.num_bytes(opt_state)
    return {
        "model": model_cfg.name,
        "rank": rank,
        "alpha": lora_cfg.alpha,
        "targets": list(lora_cfg.targets),
        "dtype": dtype,
        "lora_params": n,
        "base_params": base,
        "lora_fraction_of_base": n / base,
        "lora_bytes": lora_bytes,
        "grad_bytes": lora_bytes,
        "adamw_state_bytes": opt_bytes,
        "lora_plus_adamw_bytes": lora_bytes + opt_bytes,
        "lora_plus_adamw_plus_grads_bytes": 2 * lora_bytes + opt_bytes,
        "lora_plus_adamw_mib": (lora_bytes + opt_bytes) / mib,
        "lora_plus_adamw_plus_grads_mib": (2 * lora_bytes + opt_bytes) / mib,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=None, help="default: alpha = rank")
    ap.add_argument("--targets", nargs="+", default=list(LORA_TARGETS))
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    print(json.dumps(report(args.model, args.rank, args.alpha, tuple(args.targets), args.dtype),
                     indent=2))


if __name__ == "__main__":
    main()
