"""This project's GRPO step against TRL's `GRPOTrainer` at its faster dtype, same job,
same machine, one run: each configuration in a process of its own, one after another.

    python benchmarks/grpo_step_vs_trl.py --out docs/perf/grpo_step_vs_trl.json

The job: 4 prompts x 4 samples x exactly 128 new tokens (no stop token, no stop
string), temperature 1, LoRA rank 16 on every projection, beta 0.04, one update per
step. Ours is the real command (`python -m grpo_jax.train`, no SFT, gsm_symbolic
prompts padded to the run's width, which is longer than TRL's prompts: more work for
ours), timed by its own `step_time_s` on the steps after the first (the first
compiles); TRL's is `trl_step_reference.py` (a step between its trainer callbacks,
after a warm-up step). The ratio is TRL's best step over ours, against the faster of
TRL's float32 and bfloat16. Needs the `reference` extra plus `pip install trl peft`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import tyro

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sampler_throughput import machine_facts, write_result  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Args:
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    """Our compute dtypes to time (`auto` picks one of them: its log line says which;
    `bfloat16+onednn`: bfloat16 with --matmul onednn)."""
    prompts: int = 4
    group: int = 4
    new_tokens: int = 128
    steps: int = 3
    """Our steps per run; the first (compiling) is left out of the figure."""
    trl_steps: int = 2
    """TRL's timed steps (after its warm-up step)."""
    out: str | None = None


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-2000:]}")
    return proc


def ours(args: Args, dtype: str) -> dict:
    compute, _, matmul = dtype.partition("+")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        proc = _run([sys.executable, "-m", "grpo_jax.train", "--preset", "cpu-270m",
                     "--output-dir", str(run_dir), "--dtype", compute,
                     "--matmul", matmul or "auto",
                     "--sft.steps", "0",
                     "--steps", str(args.steps), "--eval-problems", "0",
                     "--grpo.num-prompts", str(args.prompts),
                     "--grpo.group-size", str(args.group), "--grpo.no-filter-zero-variance",
                     "--sampler.max-new-tokens", str(args.new_tokens), "--sampler.stop-ids",
                     "--sampler.stop-strings", "--save-every", str(args.steps),
                     "--no-tensorboard"])
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        prompt_len = json.loads((run_dir / "config.json").read_text()).get("prompt_len")
    timed = rows[1:]
    return {"dtype": dtype, "step_s": [r["step_time_s"] for r in rows],
            "best_s": min(r["step_time_s"] for r in timed),
            "mean_s": sum(r["step_time_s"] for r in timed) / len(timed),
            "sample_s": [r["time/sample_s"] for r in timed],
            "update_s": [r["time/update_s"] for r in timed],
            "completion_len": [r["completion_len/mean"] for r in rows],
            "compiles": [r["compiles"] for r in rows], "prompt_len": prompt_len,
            "log": [line for line in proc.stderr.splitlines() if "dtype" in line or "matmul" in line]}


def trl(args: Args, dtype: str) -> dict:
    proc = _run([sys.executable, str(HERE / "trl_step_reference.py"), "--dtype", dtype,
                 "--prompts", str(args.prompts), "--group", str(args.group),
                 "--completion-len", str(args.new_tokens), "--steps", str(args.trl_steps),
                 "--json"])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: Args) -> dict:
    machine = machine_facts()
    our = {d: ours(args, d) for d in args.dtypes}
    theirs = {d: trl(args, d) for d in ("float32", "bfloat16")}
    best = min(theirs.values(), key=lambda r: r["best_seconds"])
    return {"job": {"prompts": args.prompts, "group": args.group,
                    "new_tokens": args.new_tokens, "lora_rank": 16, "beta": 0.04},
            "machine": machine, "ours": our, "trl": theirs, "trl_faster_dtype": best["dtype"],
            "speedup_vs_trl_faster": {d: best["best_seconds"] / r["best_s"]
                                      for d, r in our.items()}}


def main(argv=None) -> int:
    args = tyro.cli(Args, args=argv)
    write_result(run(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
