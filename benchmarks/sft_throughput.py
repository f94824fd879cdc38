"""Throughput of the SFT phase on the run's real data: solutions a minute, tokens a second.

    python benchmarks/sft_throughput.py --steps 4 --json                      # the recipe
    python benchmarks/sft_throughput.py --batch-size 32 --pack-length 1024 --json

Runs `--steps` SFT steps of the `--preset` recipe (its model, prompts, gold targets
and stream of problems) with the batch size and packing given, through the same
`sft.sft_step` the trainer calls. Reports the first step (with its compile) apart,
then the median of the others: step time, solutions a minute, real tokens (prompt and
target) and target tokens a second, the batch's fill (real tokens over token slots),
the model FLOPs those tokens cost beside this machine's measured float32 matmul rate,
and the process's peak RSS. Prints JSON with --json.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import resource
import sys
import time

import jax
import numpy as np

from grpo_jax import data, presets, runs, sft, sharding, train
from grpo_jax.context import StepContext
from grpo_jax.model import gemma3, lora as lora_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_costs import model_flops_per_token  # noqa: E402
from sampler_throughput import cli_main, measure_matmul_flops  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Args:
    """Benchmark SFT steps of a preset's recipe, packed or not."""

    preset: str = "cpu-270m"
    steps: int = 4
    """SFT steps run; the first (with its compile) is reported apart."""
    batch_size: int | None = None
    """Problems a step (default: the preset's sft.batch_size)."""
    pack_length: int | None = None
    """Packed row length (0: one problem a row; default: the preset's)."""
    max_tokens: int | None = None
    """Longest target (default: the preset's sft.max_tokens)."""
    json: bool = False
    """Print one JSON object instead of a readable summary."""


def run(args: Args) -> dict:
    if args.steps < 2:
        raise ValueError("--steps must be at least 2: the first step compiles")
    cfg = presets.train_preset(args.preset)
    s = cfg.sft
    cfg = dataclasses.replace(cfg, sft=dataclasses.replace(
        s, steps=args.steps, batch_size=args.batch_size or s.batch_size,
        pack_length=s.pack_length if args.pack_length is None else args.pack_length,
        max_tokens=args.max_tokens or s.max_tokens))
    matmul_flops = measure_matmul_flops()
    base = runs.load_run_base(cfg)
    plan = sharding.local_plan()
    problems = data.load_problems(cfg.data, "train", need_solution=True)
    shapes, sft_problems = sft.run_shapes(cfg, base.tokenizer, problems)
    fns = train.sft_step_functions(cfg, base.cfg, plan)
    params = sharding.put_tree(base.params, gemma3.param_shardings(plan, base.cfg))
    state = train.place_state(plan, fns, base.cfg, fns.init_state(
        lora_lib.init_lora(base.cfg, cfg.lora, jax.random.key(0))))
    ctx = StepContext(cfg, base.cfg, base.tokenizer, fns, sft_problems, shapes, plan)
    rows = []
    for step in range(1, args.steps + 1):
        host = sft.sft_batch(cfg, base.tokenizer, sft_problems, step, shapes)  # its shapes
        began = time.perf_counter()
        state, m = sft.sft_step(ctx, params, state, step)
        rows.append({"step_s": time.perf_counter() - began,
                     "real_tokens": m["sft/fill"] * host.tokens.size,
                     "target_tokens": m["sft/target_tokens"], "fill": m["sft/fill"],
                     "slots": int(host.tokens.size), "loss": m["sft/loss"]})
    steady = rows[1:]
    step_s = float(np.median([r["step_s"] for r in steady]))
    real = float(np.mean([r["real_tokens"] for r in steady]))
    targets = float(np.mean([r["target_tokens"] for r in steady]))
    slots = steady[0]["slots"]
    body, logits = (model_flops_per_token(base.cfg, 0, logits=False),
                    model_flops_per_token(base.cfg, 0, logits=True))
    # Forward + backward to the activations (no base-weight gradients): ~3x the forward
    # for the body over every slot and for the vocabulary projection over target slots
    # (the chunked projection is recomputed under jax.checkpoint: ~4x there).
    flops = 3 * body * slots + 4 * (logits - body) * (
        host.mask.size if cfg.sft.pack_length else host.completion_mask.size)
    return {
        "preset": args.preset, "batch_size": cfg.sft.batch_size,
        "pack_length": cfg.sft.pack_length, "max_tokens": cfg.sft.max_tokens,
        "shapes": shapes._asdict(), "sft_problems": len(sft_problems),
        "first_step_s": rows[0]["step_s"], "step_s": step_s,
        "solutions_per_min": cfg.sft.batch_size * 60 / step_s,
        "real_tokens_per_s": real / step_s, "target_tokens_per_s": targets / step_s,
        "fill": float(np.mean([r["fill"] for r in steady])),
        "model_gflop_per_step": flops / 1e9, "achieved_gflop_s": flops / step_s / 1e9,
        "matmul_gflop_s": matmul_flops / 1e9,
        "losses": [r["loss"] for r in rows],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "machine": {"processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "jax": jax.__version__,
                    "backend": jax.default_backend()},
    }


def main(argv=None) -> int:
    return cli_main(Args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
