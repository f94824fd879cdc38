"""Plot a run's reward, format rate and KL against the training step.

    python scripts/plot_metrics.py RUN_DIR [--out FILE.png]

Reads RUN_DIR/metrics.jsonl (written by grpo_jax.metrics.MetricsLogger) and writes a
PNG with three stacked panels (default RUN_DIR/metrics.png). Needs matplotlib.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Sequence

import tyro

# (metrics key, panel title)
PANELS = (("reward/mean", "reward (mean)"), ("format_rate", "format rate"), ("kl", "KL to reference"))


@dataclasses.dataclass(frozen=True)
class Args:
    """Plot reward/mean, format_rate and kl from RUN_DIR/metrics.jsonl."""

    run_dir: tyro.conf.Positional[Path]
    """Training output directory holding metrics.jsonl."""
    out: Path | None = None
    """PNG to write (default: RUN_DIR/metrics.png)."""


def _value(row: dict, key: str) -> float:
    # null (a non-finite value) and absent keys become gaps in the line, not zeros
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def plot(metrics_rows: Sequence[dict], out_path: str | Path) -> Path:
    """Draw the three panels of `metrics_rows` (dicts with "step") to `out_path` (PNG)."""
    if not metrics_rows:
        raise ValueError("no metrics rows to plot")
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rows = sorted(metrics_rows, key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(len(PANELS), 1, sharex=True, figsize=(7, 2.4 * len(PANELS)))
    try:
        for ax, (key, title) in zip(axes, PANELS):
            ax.plot(steps, [_value(r, key) for r in rows], marker="." if len(rows) < 50 else None)
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
