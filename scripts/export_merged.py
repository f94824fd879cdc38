"""Write a training run's base + LoRA merged weights as a Hugging Face checkpoint.

    python scripts/export_merged.py --run-dir runs/tiny --out exports/tiny [--step N]
        [--dtype float32|bfloat16] [--overwrite]

The same as `python -m grpo_jax.export`; see grpo_jax/export.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Runnable from a checkout that was not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo_jax.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
