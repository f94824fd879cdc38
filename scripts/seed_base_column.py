"""Reuse another run's base-model evaluation column instead of recomputing it.

The base column depends only on the base weights and the evaluation setup (problems,
budget, prompt), and greedy decoding repeats it exactly; at 500 problems it costs
~30 minutes on 2 CPU cores because the base model never stops. This copies the
`base` column of SOURCE (an eval*.json beside its run's config.json) into the same
file name in RUN_DIR when both runs have the same base model. `evaluate` still
checks the setup: a file whose setup differs from the run's is dropped and every
column recomputed, so a wrong seed costs time, never a wrong figure.

    python scripts/seed_base_column.py docs/cpu-270m/eval_n500.json runs/cpu-270m-long
"""
import argparse
import json
import sys
from pathlib import Path

from grpo_jax import runs

BASE_MODEL_FIELDS = ("model", "checkpoint", "gguf", "dtype")


def base_model(run_dir: Path) -> dict:
    config = json.loads((run_dir / "config.json").read_text())
    return {k: config.get(k) for k in BASE_MODEL_FIELDS}


def seed(source: Path, run_dir: Path) -> Path:
    target = run_dir / source.name
    if target.exists():
        raise SystemExit(f"error: {target} exists; not replacing it")
    mine, theirs = base_model(run_dir), base_model(source.parent)
    if mine != theirs:
        raise SystemExit(f"error: base models differ: {run_dir} has {mine}, "
                         f"{source.parent} has {theirs}")
    result = runs.read_eval(source.parent, source.name)
    if "base" not in result:
        raise SystemExit(f"error: {source} has no base column")
    seeded = {k: result[k] for k in ("setup", "num_problems", "dataset", "split", "base")}
    seeded["steps"] = {"base": result["steps"]["base"]}
    seeded["records"] = {"base": result["records"]["base"]}
    seeded["seeded_from"] = {"base": str(source)}
    runs.write_eval(run_dir, seeded, target.name)
    return target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="an eval*.json beside its run's config.json")
    parser.add_argument("run_dir", type=Path, help="the run directory to seed")
    args = parser.parse_args(argv)
    try:
        print(f"seeded {seed(args.source, args.run_dir)}")
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
