"""This project's sampler against Hugging Face `generate` at its faster dtype, same job,
same machine, one run: each configuration in a process of its own, one after another.

    python benchmarks/generate_vs_hf.py --batches 16 64 --out docs/perf/generate_vs_hf.json

For each batch: `sampler_throughput.py` at each of --dtypes (auto is what a run uses)
and `hf_generate_reference.py` in float32 and bfloat16; the ratio is the sampler's
tokens/s over the faster of transformers' two. Needs the `reference` extra.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import tyro

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sampler_throughput import write_result  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Args:
    batches: tuple[int, ...] = (16, 64)
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "auto")
    """The sampler's dtypes to time."""
    prompt_len: int = 64
    new_tokens: int = 128
    group: int = 4
    out: str | None = None
    """Write the JSON here too."""


def _json_run(script: str, *flags: str) -> dict:
    proc = subprocess.run([sys.executable, str(HERE / script), *flags, "--json"],
                          capture_output=True, text=True, env={**os.environ,
                                                               "JAX_PLATFORMS": "cpu"})
    if proc.returncode:
        raise RuntimeError(f"{script} {' '.join(flags)} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: Args) -> dict:
    job = ["--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
    results, machine = [], None
    for batch in args.batches:
        ours = {d: _json_run("sampler_throughput.py", *job, "--batch", str(batch),
                             "--group", str(args.group), "--ignore-eos", "--dtype", d,
                             "--baseline-new-tokens", "0", "--repeats", "2")
                for d in args.dtypes}
        hf = {d: _json_run("hf_generate_reference.py", *job, "--batch", str(batch),
                           "--dtype", d) for d in ("float32", "bfloat16")}
        machine = machine or next(iter(ours.values()))["machine"]
        hf_best = max(hf.values(), key=lambda r: r["tokens_per_s"])
        results.append({
            "batch": batch,
            "sampler": {d: {k: r.get(k) for k in (
                "dtype", "matmul", "tokens_per_s", "decode_tokens_per_s", "prefill_s",
                "decode_s", "compile_s", "decode_utilization_of_matmul")}
                        for d, r in ours.items()},
            "hf_generate": {d: {"tokens_per_s": r["tokens_per_s"], "seconds": r["seconds"],
                                "torch_threads": r["torch_threads"]} for d, r in hf.items()},
            "hf_faster_dtype": hf_best["dtype"],
            "speedup_vs_hf_faster": {d: r["tokens_per_s"] / hf_best["tokens_per_s"]
                                     for d, r in ours.items()},
        })
    return {"job": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                    "group": args.group, "greedy": True, "ignore_eos": True},
            "machine": machine, "results": results}


def main(argv=None) -> int:
    args = tyro.cli(Args, args=argv)
    write_result(run(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
