"""Plot a run's curves against the training step.

    python scripts/plot_metrics.py RUN_DIR [--out FILE.png]

Reads RUN_DIR/metrics.jsonl (written by grpo_jax.metrics.MetricsLogger) and writes a
PNG of stacked panels (default RUN_DIR/metrics.png): the SFT loss, the reward per
function, format and exact rates, KL, completion length and the fraction of groups
with zero reward variance (no learning signal). Panels no row has are left out.
Needs matplotlib.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Sequence

import tyro

# (panel title, metrics keys drawn in it)
PANELS = (
    ("SFT loss (NLL per target token)", ("sft/loss",)),
    ("reward per function (mean)", ("reward/mean", "reward/match_format_exactly",
                                    "reward/match_format_approximately", "reward/check_answer",
                                    "reward/check_numbers", "reward/kl_penalty")),
    ("format and exact rate of the samples", ("format_rate", "accuracy")),
    ("KL to reference", ("kl",)),
    ("completion length (tokens)", ("completion_len/mean",)),
    ("groups with zero reward variance", ("zero_variance_groups",)),
)


@dataclasses.dataclass(frozen=True)
class Args:
    """Plot the SFT loss, rewards, format/exact rates, KL, completion length and
    zero-variance groups from RUN_DIR/metrics.jsonl."""

    run_dir: tyro.conf.Positional[Path]
    """Training output directory holding metrics.jsonl."""
    out: Path | None = None
    """PNG to write (default: RUN_DIR/metrics.png)."""


def _value(row: dict, key: str) -> float:
    # null (a non-finite value) and absent keys become gaps in the line, not zeros
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def plot(metrics_rows: Sequence[dict], out_path: str | Path) -> Path:
    """Draw the panels of `metrics_rows` (dicts with "step") to `out_path` (PNG)."""
    if not metrics_rows:
        raise ValueError("no metrics rows to plot")
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rows = sorted(metrics_rows, key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    panels = [(title, [k for k in keys if any(k in r for r in rows)]) for title, keys in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        raise ValueError("the metrics rows hold none of the plotted keys")
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(7, 2.2 * len(panels)),
                             squeeze=False)
    axes = axes[:, 0]
    try:
        for ax, (title, keys) in zip(axes, panels):
            for key in keys:
                ax.plot(steps, [_value(r, key) for r in rows], label=key.split("/")[-1],
                        marker="." if len(rows) < 50 else None)
            if len(keys) > 1:
                ax.legend(fontsize=7, loc="best")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("step")
        fig.tight_layout()
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_path, dpi=100)
    finally:
        plt.close(fig)
    return out_path


def main(argv: Sequence[str] | None = None) -> int:
    args = tyro.cli(Args, args=argv)
    from grpo_jax.metrics import read_metrics

    path = args.run_dir / "metrics.jsonl"
    try:
        if not path.is_file():
            raise FileNotFoundError(f"no metrics.jsonl in {args.run_dir}")
        rows = read_metrics(path)
        out = plot(rows, args.out if args.out is not None else args.run_dir / "metrics.png")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
