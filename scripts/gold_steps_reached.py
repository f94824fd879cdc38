"""How far each column of an evaluation file follows the gold solutions' steps.

Exact accuracy needs the right operations *and* right arithmetic; step accuracy
measures only the arithmetic. This measures the operations: for each problem, which
results of the gold solution's steps the completion computes with a right step
(`arithmetic.gold_values_reached`). With a calculator nearly every stated step is
right, so what is left is whether the model chose the steps the solution takes.

    python scripts/gold_steps_reached.py runs/cpu-270m-calc eval_n500.json [--json OUT]
"""
import argparse
import json
import sys
from pathlib import Path

from grpo_jax import arithmetic, data, runs
from grpo_jax.eval_metrics import wilson_interval


def reached(records, solutions: dict[int, str]) -> dict:
    """Totals over one column's records: gold results reached (pooled over problems),
    problems whose first gold step is reached, problems with every gold step reached."""
    got = total = first = every = n = 0
    for r in records:
        g, t, f = arithmetic.gold_values_reached(r["completion"], solutions[r["index"]])
        if not t:
            continue  # a gold solution without a readable step: nothing to follow
        n += 1
        got, total, first, every = got + g, total + t, first + f, every + (g == t)
    if not n:
        raise ValueError("no record's gold solution states a step")
    return {"problems": n, "gold_values": total, "gold_values_reached": got / total,
            "first_step_reached": first / n, "first_step_ci95": wilson_interval(first, n),
            "all_steps_reached": every / n, "all_steps_ci95": wilson_interval(every, n)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("eval_file", nargs="?", default=runs.EVAL_FILE)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    cfg = runs.run_config(args.run_dir)
    result = runs.read_eval(args.run_dir, args.eval_file)
    if not result.get("records"):
        raise SystemExit(f"error: {args.run_dir / args.eval_file} has no per-problem records")
    indices = result["setup"]["indices"]
    problems = data.held_out_problems(cfg.data, result["setup"]["split"], len(indices))
    if [p.index for p in problems] != indices:
        raise SystemExit("error: the run's held-out problems are not the file's (another "
                         "dataset version?)")
    solutions = {p.index: p.solution or "" for p in problems}
    figures = {c: reached(rows, solutions) for c, rows in result["records"].items()}
    print("| column | gold results reached | first gold step reached | every gold step "
          "reached |\n|---|---:|---:|---:|")
    for c, f in figures.items():
        lo, hi = f["first_step_ci95"]
        lo2, hi2 = f["all_steps_ci95"]
        print(f"| {c} | {f['gold_values_reached']:.1%} of {f['gold_values']} | "
              f"{f['first_step_reached']:.1%} ({lo:.1%}-{hi:.1%}) | "
              f"{f['all_steps_reached']:.1%} ({lo2:.1%}-{hi2:.1%}) |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
