"""`python -m grpo_jax.train ARGS` with the digit-fraction reward of test_learning (a
signal the random tiny model can learn), for tests that train in subprocesses."""
from __future__ import annotations

import dataclasses
import sys

from grpo_jax import presets, rewards, train
from grpo_jax.cli import run_cli
from grpo_jax.config import OptimizerConfig
from grpo_jax.rewards import RewardConfig


def digit_fraction(completions, answers):
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]


def main(argv: list[str]) -> int:
    rewards.register_reward("digit_fraction", digit_fraction)
    cfg = dataclasses.replace(
        presets.parse_run_config(argv), rewards=RewardConfig(functions=(("digit_fraction", 1.0),)),
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.0, max_grad_norm=1.0))
    return run_cli(lambda: train.train(cfg), train.TrainingError)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
