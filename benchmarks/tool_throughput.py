"""What a tool costs the sampler: tokens/s with the run's tool on and off, on its own
model and problems.

    python benchmarks/tool_throughput.py --run-dir runs/i25-default-calc --json

Random prompts (`sampler_throughput.py`) never call a tool, so this one samples what
a GRPO step samples: the run's policy (its newest checkpoint; SFT adapters merged as
GRPO does), its prompts (training problems, its prompt format and prefill), its
sampler settings, B prompts x G samples in lockstep. With the tool, the decode runs in
segments: each time rows complete calls the loop exits, the host reads the rows back,
runs the tool and uploads the results. Reported: tokens/s both ways, decode steps,
segments (decode program calls), calls, the host's share of the time, and the
machine's matmul rate beside them. Generated lengths differ between the two ways (the
tool writes results the model would have written itself, and the texts diverge), so
compare tokens/s, not seconds.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import resource
import sys
import time
from pathlib import Path

import jax
import numpy as np

from grpo_jax import data, runs, sampler, stop_strings, tools

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampler_throughput import cli_main, measure_matmul_flops  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Args:
    """Sampler tokens/s with a run's tool on and off."""

    run_dir: Path
    """A run trained with --sampler.tools (its config names the tool)."""
    prompts: int = 8
    """Prompts per batch (each sampled --group times)."""
    group: int = 4
    repeats: int = 2
    """Timed runs of each way after a warm-up run; the fastest is reported."""
    seed: int = 0
    json: bool = False


def _timed_answer_calls(stats: dict):
    """sampler.answer_calls, counting its calls (one after the start program and one
    after each decode segment) and the time in them (read back, tool, upload), the
    segment's own decode waited for first."""
    real = sampler.answer_calls

    def answer_calls(*args):
        jax.block_until_ready(args[1])
        began = time.perf_counter()
        out = real(*args)
        stats["host_s"] += time.perf_counter() - began
        stats["rounds"] += 1
        return out

    return real, answer_calls


def run(args: Args) -> dict:
    if min(args.prompts, args.group, args.repeats) <= 0:
        raise ValueError("--prompts, --group and --repeats must be positive")
    cfg = runs.run_config(args.run_dir)
    if not cfg.sampler.tools:
        raise ValueError(f"{args.run_dir} was trained without --sampler.tools")
    matmul = measure_matmul_flops()
    base = runs.load_run_base(cfg)
    adapters = runs.restore_adapters(args.run_dir, cfg, base.cfg)
    params, lora = adapters.policy(base.params)
    problems = data.load_problems(cfg.data, "train")[:args.prompts]
    prompts = data.run_prompts(base.tokenizer, problems, cfg.data)
    table = stop_strings.stop_table(base.tokenizer, cfg.sampler.stop_strings,
                                    base.cfg.vocab_size)
    key = jax.random.key(args.seed)
    result = {"run_dir": str(args.run_dir), "tool": cfg.sampler.tools[0],
              "prompts": args.prompts, "group": args.group,
              "max_new_tokens": cfg.sampler.max_new_tokens,
              "temperature": cfg.sampler.temperature}
    for way in ("off", "on"):
        sampling = cfg.sampler if way == "on" else dataclasses.replace(cfg.sampler, tools=())
        box = tools.toolbox(base.tokenizer, sampling, base.cfg.vocab_size)
        stats = {"host_s": 0.0, "rounds": 0}
        real, timed = _timed_answer_calls(stats)
        sampler.answer_calls = timed
        try:
            def once():
                return sampler.sample_prompts(params, prompts, key, cfg=base.cfg,
                                              sampling=sampling, group=args.group, lora=lora,
                                              stop_table=table, toolbox=box)

            began = time.perf_counter()
            once()  # compiles
            compile_s = time.perf_counter() - began
            best, out = float("inf"), None
            for _ in range(args.repeats):
                stats.update(host_s=0.0, rounds=0)
                began = time.perf_counter()
                out = once()
                elapsed = time.perf_counter() - began
                if elapsed < best:
                    best, kept = elapsed, dict(stats)
        finally:
            sampler.answer_calls = real
        generated = int(np.sum(out.lengths))
        result[way] = {
            "seconds": best, "generated_tokens": generated, "tokens_per_s": generated / best,
            "decode_steps": int(out.steps), "first_run_s": compile_s,
            # Lockstep: the batch runs until its longest row stops, so time per decode
            # step is the like-for-like figure (tokens differ between the two ways).
            "ms_per_decode_step": 1e3 * best / max(int(out.steps), 1),
            # Decode program calls: one without a tool; with one, one per round of calls + 1.
            "decode_segments": max(kept["rounds"] - 1, 1) if way == "on" else 1,
            "tool_calls": None if out.tool_calls is None else int(out.tool_calls.sum()),
            "tool_tokens": None if out.policy_mask is None else int(
                sum((~out.policy_mask[r, :n]).sum() for r, n in enumerate(out.lengths))),
            "host_tool_s": kept["host_s"] if way == "on" else 0.0,
        }
    result["tokens_per_s_on_over_off"] = (result["on"]["tokens_per_s"]
                                          / result["off"]["tokens_per_s"])
    result["step_time_on_over_off"] = (result["on"]["ms_per_decode_step"]
                                       / result["off"]["ms_per_decode_step"])
    result["machine"] = {"platform": platform.processor() or platform.machine(),
                         "cpu_count": os.cpu_count(), "matmul_f32_gflops": matmul / 1e9,
                         "cpu_flags": _cpu_kind()}
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return result


def _cpu_kind() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    if "amx_tile" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"


def main(argv=None) -> int:
    return cli_main(Args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
