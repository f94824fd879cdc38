"""A decode step taken apart: each part jitted alone at a model's shapes, random weights.

    python benchmarks/decode_step_parts.py --batch 16 --out docs/perf/decode_step_parts.json

Parts, per compute dtype: the tied logits (vocabulary-major, as the sampler computes
them, and batch-major), and every layer's projections (q/k/v, o, gate/up, down) with
nothing between them; then token choice (greedy, t = 1, t = 0.7) on float32
logits. What a whole step takes beyond their sum is attention over the cache, norms,
RoPE, cache writes and the loop (`benchmarks/sampler_throughput.py`: decode_step_ms).
"""
from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sampler_throughput import best_time, cli_main, machine_facts, save_result  # noqa: E402

from grpo_jax import sampling  # noqa: E402
from grpo_jax.config import SamplerConfig  # noqa: E402
from grpo_jax.model.config import DTYPES, model_preset  # noqa: E402
from grpo_jax.model.matmul import matmul  # noqa: E402


@dataclasses.dataclass
class Args:
    model: str = "gemma3-270m"
    batch: int = 16
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    repeats: int = 20
    out: str | None = None
    """Also write the JSON here."""
    machine: bool = True
    """Measure the machine's 2048^3 matmul rates too (a few seconds)."""
    json: bool = False


def best_ms(fn, *args, repeats: int) -> float:
    """Best milliseconds of `repeats` calls of jit(fn), after one that compiles."""
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    seconds, _ = best_time(lambda: fn(*args), repeats)
    return seconds * 1e3


def run(args: Args) -> dict:
    if args.batch < 1 or args.repeats < 1:
        raise ValueError("--batch and --repeats must be positive")
    unknown = set(args.dtypes) - set(DTYPES)
    if unknown:
        raise ValueError(f"unknown dtype(s) {sorted(unknown)}; choose from {DTYPES}")
    cfg = model_preset(args.model)
    rng = np.random.default_rng(0)
    d, b, v = cfg.embed_dim, args.batch, cfg.vocab_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    heads = cfg.num_heads * cfg.head_dim
    result = {"model": cfg.name, "batch": b, "ms": {},
              "machine": machine_facts() if args.machine else None}

    def weight(*shape, dtype):
        return jnp.asarray(rng.standard_normal(shape) * 0.02, dtype)

    for dtype in args.dtypes:
        embed = weight(v, d, dtype=dtype)
        hidden = weight(b, d, dtype=dtype)
        w_qkv, w_o = weight(d, qkv, dtype=dtype), weight(heads, d, dtype=dtype)
        w_up, w_down = weight(d, 2 * cfg.ffw_dim, dtype=dtype), weight(cfg.ffw_dim, d, dtype=dtype)

        def projections(h, w_qkv, w_o, w_up, w_down, dtype=dtype):
            for _ in range(cfg.num_layers):
                q = matmul("bd,de->be", h, w_qkv, dtype)
                h = h + matmul("be,ed->bd", q[:, :heads], w_o, dtype)
                g = matmul("bd,df->bf", h, w_up, dtype)
                h = h + matmul("bf,fd->bd", jax.nn.gelu(g[:, :cfg.ffw_dim]) * g[:, cfg.ffw_dim:],
                               w_down, dtype)
            return h

        ms = result["ms"][dtype] = {}
        ms["logits_vocab_major"] = best_ms(
            lambda h, e, dt=dtype: matmul("bd,vd->vb", h, e, dt, jnp.float32), hidden, embed,
            repeats=args.repeats)
        ms["logits_batch_major"] = best_ms(
            lambda h, e, dt=dtype: matmul("bd,vd->bv", h, e, dt, jnp.float32), hidden, embed,
            repeats=args.repeats)
        ms["layer_projections"] = best_ms(projections, hidden, w_qkv, w_o, w_up, w_down,
                                          repeats=args.repeats)
        logit_flops = 2.0 * b * d * v
        ms["logits_gflops_per_s"] = logit_flops / ms["logits_vocab_major"] / 1e6
    logits = jnp.asarray(rng.standard_normal((v, b)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), b)
    result["ms"]["choose"] = {
        name: best_ms(lambda lg, k, s=s: sampling.choose_tokens(lg, k, s), logits, keys,
                      repeats=args.repeats)
        for name, s in (("greedy", SamplerConfig(temperature=0.0)),
                        ("t1", SamplerConfig(temperature=1.0)),
                        ("t0.7", SamplerConfig(temperature=0.7)))}
    if args.out:
        save_result(result, args.out)
    return result


def main(argv=None) -> int:
    return cli_main(Args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
