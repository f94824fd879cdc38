"""Throughput of the KV-cached sampler, beside the machine's ceilings and a no-cache baseline.

    python benchmarks/sampler_throughput.py --batch 64 --group 4 --prompt-len 64 \
        --new-tokens 128 --ignore-eos --json

Prompts are random token ids (BOS first); --ignore-eos makes every row run the
full budget so runs are comparable. Reports prefill, decode and compile time
separately; generated tokens/s; the model FLOPs the decode achieved as a fraction
of this machine's measured float32 matmul rate; the bytes a decode step reads and
the tokens/s that memory bandwidth alone would allow; peak memory; and the same
job through the uncached sampler (recompute everything each step).
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from grpo_jax import decode, sharding
from grpo_jax.config import SamplerConfig
from grpo_jax.model import dtype_choice
from grpo_jax.model.config import model_preset
from grpo_jax.model import gemma3
from grpo_jax.sampler import check_group
from grpo_jax.tokenizer import BOS_ID

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model_costs import cache_bytes, model_flops_per_token  # noqa: E402
from tests.uncached_sampler import sample_uncached  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Args:
    """Benchmark the KV-cached batched sampler."""

    model: str = "gemma3-270m"
    """Preset: gemma3-270m loads the embedded weights; others use random weights."""
    dtype: str = "auto"
    """Compute dtype: float32, bfloat16, or auto (the faster on this machine, as a run's)."""
    matmul: str = "auto"
    """Matmuls: xla, onednn, or auto (the probe's choice under --dtype auto, as a run's)."""
    batch: int = 64
    """Total rows decoded together (prompts x group)."""
    group: int = 4
    """Samples per prompt: each prompt is prefilled once and fanned out to this many rows."""
    prompt_len: int = 64
    """Prompt tokens per prompt."""
    new_tokens: int = 128
    """Tokens generated per row."""
    ignore_eos: bool = False
    """Never stop early (every row decodes all --new-tokens)."""
    temperature: float = 0.0
    """0 = greedy (as the transformers reference figures)."""
    repeats: int = 2
    """Timed runs after compilation; the fastest is reported."""
    baseline_new_tokens: int = 8
    """Tokens the uncached baseline generates (0: skip it). Fewer tokens than the main
    run flatter the baseline (shorter sequences), so the reported speedup is a lower bound."""
    seed: int = 0
    json: bool = False
    """Print one JSON object instead of a readable summary."""


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best, out


def measure_matmul_flops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of an n x n x n matmul in `dtype`, summed in float32 as the model's
    (`grpo_jax.model.matmul`): the machine's compute ceiling for this job."""
    seconds = dtype_choice.time_matmuls(dtype, ((n, n, n),), repeats)
    return 2.0 * n ** 3 / seconds


def machine_facts() -> dict:
    """What the figures depend on: the CPU, the flags that decide XLA's matmul paths,
    the cores, and the measured 2048^3 matmul rate in float32 and bfloat16 (and
    bfloat16 through oneDNN where it runs)."""
    name, flags = dtype_choice.cpu_identity()
    return {"cpu": name, "flags": list(flags),
            "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
            "jax": jax.__version__,
            "matmul_gflops": {d: measure_matmul_flops(dtype=d) / 1e9
                              for d in dtype_choice.runnable_candidates()}}


def measure_read_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (a sum over a buffer far larger than cache)."""
    x = jnp.ones((megabytes * 2 ** 20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    jax.block_until_ready(total(x))
    seconds, _ = best_time(lambda: total(x), repeats)
    return x.nbytes / seconds


def measure_matvec_bandwidth(rows: int = 262_144, cols: int = 640, repeats: int = 5) -> float:
    """Bytes/s at which a batch-1 matmul streams a weight matrix (the logits' shape):
    what a decode step at small batch can hope to read its weights at."""
    # Values do not change a read's speed; filling 670 MB with normals took seconds.
    w = jnp.ones((rows, cols), jnp.float32)
    x = jnp.ones((1, cols), jnp.float32)
    mv = jax.jit(lambda x, w: jnp.einsum("bd,vd->vb", x, w))
    jax.block_until_ready(mv(x, w))
    seconds, _ = best_time(lambda: mv(x, w), repeats)
    return w.nbytes / seconds


def load_params(model: str, dtype: str | None = None, matmul: str = "auto"):
    """(config, params) of `model` computing in `dtype` with `matmul`'s matmuls
    ("auto": as a run chooses)."""
    from grpo_jax.model.load import load_model, with_dtype

    if model == "gemma3-270m":
        loaded = load_model(model, dtype=dtype, matmul=matmul)
        return loaded.cfg, loaded.params
    cfg = with_dtype(model_preset(model), dtype, matmul)
    return cfg, gemma3.init_params(cfg, jax.random.key(0))


def run(args: Args) -> dict:
    check_group(args.batch, args.group)
    if min(args.prompt_len, args.new_tokens, args.repeats) <= 0:
        raise ValueError("--prompt-len, --new-tokens and --repeats must be positive")
    machine = machine_facts()
    bandwidth = measure_read_bandwidth()
    matvec_bandwidth = measure_matvec_bandwidth()
    cfg, params = load_params(args.model, args.dtype, args.matmul)
    # The ceiling is the matmul rate in the dtype the model computes in.
    matmul_flops = 1e9 * machine["matmul_gflops"].get(dtype_choice.candidate_of(cfg),
                                                      machine["matmul_gflops"]["float32"])
    stop_ids = () if args.ignore_eos else SamplerConfig().stop_ids
    sampling = SamplerConfig(max_new_tokens=args.new_tokens, temperature=args.temperature,
                             stop_ids=stop_ids)
    num_prompts = args.batch // args.group
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(3, cfg.vocab_size, (num_prompts, args.prompt_len), dtype=np.int32)
    tokens[:, 0] = BOS_ID
    tokens = jnp.asarray(tokens)
    mask = jnp.ones(tokens.shape, bool)
    key = jax.random.key(args.seed)
    cache_len = args.prompt_len + args.new_tokens

    # The engine's programs, compiled ahead so compile time is reported apart.
    plan = sharding.local_plan()
    engine = decode.programs(cfg, sampling, cache_len, args.group, plan)
    # Weights as `sample` hands them to the programs (packed for AMX tiles where the
    # decode matmul is AMX's).
    params, _ = decode.place_weights(params, None, cfg, plan)
    ids = jnp.arange(num_prompts, dtype=jnp.int32)
    active, need = jnp.ones((args.batch,), bool), jnp.int32(args.batch)
    t0 = time.perf_counter()
    # No stop-string table, no tool-call table.
    start_c = engine.start.lower(params, None, tokens, mask, ids, key, None, None).compile()
    cache_shape, rows_shape = jax.eval_shape(
        lambda: engine.start.fn(params, None, tokens, mask, ids, key, None, None))
    decode_c = engine.decode.lower(params, None, cache_shape, rows_shape, active, need,
                                   None, None).compile()
    compile_s = time.perf_counter() - t0

    prefill_s, decode_s, out = float("inf"), float("inf"), None
    for _ in range(args.repeats):
        begin = time.perf_counter()
        cache, rows = jax.block_until_ready(start_c(params, None, tokens, mask, ids, key, None,
                                                    None))
        mid = time.perf_counter()
        _, rows, ran = jax.block_until_ready(decode_c(params, None, cache, rows, active, need,
                                                      None, None))
        end = time.perf_counter()
        prefill_s, decode_s = min(prefill_s, mid - begin), min(decode_s, end - mid)
        out = rows.output(ran + 1)
    generated = int(np.sum(out.lengths))
    steps = int(out.steps)
    total_s = prefill_s + decode_s

    # Decode FLOPs: each generated token (after the first, which prefill's logits give)
    # runs one forward at its own context length.
    lengths = np.asarray(out.lengths)
    decode_flops = sum(model_flops_per_token(cfg, args.prompt_len + t)
                       for n in lengths for t in range(1, int(n)))
    # Prefill: every prompt token through the layers, logits for the last one only.
    prefill_flops = num_prompts * (
        args.prompt_len * model_flops_per_token(cfg, args.prompt_len / 2, logits=False)
        + 2.0 * cfg.vocab_size * cfg.embed_dim)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    cache_read = cache_bytes(cfg, args.batch, cache_len)
    step_bytes = weight_bytes + cache_read
    decode_tps = (generated - args.batch) / decode_s

    result = {
        "model": cfg.name, "dtype": cfg.dtype, "matmul": cfg.matmul_impl,
        "cpu_kernels": cfg.cpu_kernels, "batch": args.batch, "group": args.group,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "ignore_eos": args.ignore_eos, "temperature": args.temperature,
        "generated_tokens": generated, "decode_steps": steps,
        "tokens_per_s": generated / total_s,
        "decode_tokens_per_s": decode_tps,
        "prefill_s": prefill_s, "decode_s": decode_s, "total_s": total_s,
        "compile_s": compile_s,
        "decode_step_ms": 1e3 * decode_s / max(steps - 1, 1),
        "machine": {**machine, "read_bandwidth_gb_s": bandwidth / 1e9,
                    "matvec_stream_gb_s": matvec_bandwidth / 1e9},
        "model_gflops": {"prefill": prefill_flops / 1e9, "decode": decode_flops / 1e9},
        "decode_gflops_per_s": decode_flops / decode_s / 1e9,
        "decode_utilization_of_matmul": decode_flops / decode_s / matmul_flops,
        "decode_step_bytes": {"weights": weight_bytes, "kv_cache_max": cache_read,
                              "total": step_bytes},
        # Tokens/s if a decode step only had to read its bytes: at the raw read rate,
        # and at the rate a batch-1 matmul actually streams weights.
        "bandwidth_bound_tokens_per_s": args.batch * bandwidth / step_bytes,
        "matvec_stream_bound_tokens_per_s": args.batch * matvec_bandwidth / step_bytes,
        "compute_bound_tokens_per_s": matmul_flops / model_flops_per_token(
            cfg, args.prompt_len + args.new_tokens / 2),
        "memory": {
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "decode_temp_gb": decode_c.memory_analysis().temp_size_in_bytes / 2 ** 30,
            "kv_cache_gb": cache_read / 2 ** 30,
        },
    }
    if args.baseline_new_tokens:
        base_sampling = dataclasses.replace(sampling, max_new_tokens=args.baseline_new_tokens)
        full_tokens = jnp.repeat(tokens, args.group, axis=0)
        full_mask = jnp.ones(full_tokens.shape, bool)
        fn = lambda: sample_uncached(params, full_tokens, full_mask, key, cfg=cfg,  # noqa: E731
                                     sampling=base_sampling)
        jax.block_until_ready(fn())
        base_s, base_out = best_time(fn, 1)
        base_tps = float(np.sum(base_out.lengths)) / base_s
        result["no_cache_baseline"] = {
            "new_tokens": args.baseline_new_tokens, "tokens_per_s": base_tps,
            "speedup_lower_bound": result["tokens_per_s"] / base_tps,
            "first_tokens_match": bool(np.array_equal(
                np.asarray(base_out.tokens), np.asarray(out.tokens)[:, :args.baseline_new_tokens]))
            if args.temperature == 0 else None,
        }
    return result


def save_result(result: dict, out: str | None) -> str:
    """`result` as indented JSON, written to `out` too when given."""
    text = json.dumps(result, indent=1)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
    return text


def write_result(result: dict, out: str | None) -> None:
    """Print `result` as indented JSON, and write it to `out` too when given."""
    print(save_result(result, out))


def cli_main(args_type, run_fn, argv=None) -> int:
    """A benchmark's CLI: parse `args_type`, run, print JSON (--json) or key: value
    lines; bad arguments end in one line and exit 2."""
    args = tyro.cli(args_type, args=argv)
    try:
        result = run_fn(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>32}: {value}")
    return 0


def main(argv=None) -> int:
    return cli_main(Args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
