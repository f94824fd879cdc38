"""Named run presets (`--preset`): the CPU recipe on the embedded Gemma 3 270M, its long
version, the random tiny model for tests, and the TPU v5e-8 run of Gemma 3 1B."""
from __future__ import annotations

import dataclasses
import sys
from typing import Sequence

import tyro

from grpo_jax.config import (DataConfig, GRPOConfig, MeshConfig, OptimizerConfig,
                             SamplerConfig, SFTConfig, TrainConfig)
from grpo_jax.model.config import LoraConfig
from grpo_jax.rewards import DEFAULT_REWARD_CONFIG, RewardConfig
from grpo_jax.validation import deferred_validation, validate

# The CPU recipe for the embedded Gemma 3 270M *base* model: a plain-text prompt whose
# answer opens with '<reasoning>', an SFT warm-up on gold solutions of at most 128
# tokens (which teaches the format), then GRPO from the SFT model, sampling until
# '</answer>'. cpu-270m-long (40 SFT + 30 GRPO steps) is sized so that the run and its
# 500-problem evaluation fit one 3-hour session on the slowest 2-core machine; the
# budgets and measured times are in docs/cpu_recipe.md ("The machines", "Results").
_CPU_RECIPE = TrainConfig(
    # The base model computes in whichever of float32 and bfloat16 this CPU runs
    # faster (grpo_jax/model/dtype_choice.py): bfloat16 with AVX-512 BF16, else float32.
    dtype="auto",
    steps=4, eval_problems=32, eval_max_new_tokens=200,
    sampler=SamplerConfig(max_new_tokens=160, stop_strings=("</answer>",)),
    sft=SFTConfig(steps=16, batch_size=8, learning_rate=1e-3, max_tokens=128),
    data=DataConfig(prompt_style="plain", prefill="<reasoning>"),
    # Dynamic sampling: once the format is learned most groups of 4 earn equal rewards
    # (68% in the long run before the step reward); up to 2 more rounds replace them.
    grpo=GRPOConfig(num_prompts=2, filter_zero_variance=True, max_resample_rounds=2),
    # check_steps at 2: a right answer (check_answer 3 + check_numbers 1.5) beats a
    # wrong one within 10% (0.5) with every step right (2) by 2.
    rewards=RewardConfig(functions=DEFAULT_REWARD_CONFIG.functions + (("check_steps", 2.0),)))

TRAIN_PRESETS: dict[str, TrainConfig] = {
    "cpu-270m": _CPU_RECIPE,
    "cpu-270m-long": dataclasses.replace(
        _CPU_RECIPE, preset="cpu-270m-long", output_dir="runs/cpu-270m-long", steps=30,
        save_every=10, eval_problems=64,
        sft=dataclasses.replace(_CPU_RECIPE.sft, steps=40)),
    # The recipe with the calculator (issue 25): the policy writes `<<28*4=` and the tool
    # writes `112>>`; SFT trains on gold solutions whose steps are written as calls,
    # five times the default's SFT (640 solutions packed into 512-token rows), then GRPO
    # with the tool in its rollouts (tool tokens masked out of its loss). SFT trains on
    # the gold results too (sft.tool_results): with them masked, the model alone was
    # worse than the same recipe without tools on 500 problems (format 72% against 94%),
    # with them it is not (98%), and the tool columns gain too. Figures:
    # docs/cpu_recipe.md.
    "cpu-270m-calc": dataclasses.replace(
        _CPU_RECIPE, preset="cpu-270m-calc", output_dir="runs/cpu-270m-calc", eval_problems=64,
        sampler=dataclasses.replace(_CPU_RECIPE.sampler, tools=("calculator",)),
        sft=dataclasses.replace(_CPU_RECIPE.sft, steps=40, batch_size=16, pack_length=512,
                                tool_results=True)),
    "tiny": TrainConfig(
        preset="tiny", model="tiny", output_dir="runs/tiny", steps=4, save_every=2,
        eval_problems=4, eval_max_new_tokens=16, log_samples=1,
        lora=LoraConfig(rank=4, alpha=8.0),
        sampler=SamplerConfig(max_new_tokens=16, temperature=1.0, stop_ids=(1,)),
        grpo=GRPOConfig(num_prompts=2, group_size=4, logprob_chunk=64),
        # The byte tokenizer makes a problem 450-900 tokens: each prompt keeps its last
        # 96 (still many times the 4-token window), 10-20x less work a step.
        data=DataConfig(num_train=16, num_eval=8, max_prompt_tokens=96)),
    "v5e-8-gemma3-1b": TrainConfig(
        preset="v5e-8-gemma3-1b", model="gemma3-1b", dtype="bfloat16",
        output_dir="runs/v5e-8-gemma3-1b", steps=500, save_every=50,
        lora=LoraConfig(rank=64, alpha=64.0, targets=("q", "kv", "o", "gate", "up", "down")),
        sampler=SamplerConfig(max_new_tokens=512, temperature=1.0),
        grpo=GRPOConfig(num_prompts=16, group_size=4, micro_batch=32),
        optimizer=OptimizerConfig(learning_rate=3e-6),
        data=DataConfig(dataset="gsm8k", eval_dataset="gsm8k"),
        mesh=MeshConfig(data=8),
        # Compiled for v5e (docs/tpu.md): update peak 6.0 against 6.6 GiB a chip, the
        # step's roofline 4.61 against 4.72 s. Estimates, not measurements: --attention
        # xla is the fallback.
        attention="pallas"),
}


def train_preset(name: str) -> TrainConfig:
    try:
        return TRAIN_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown preset {name!r}; choose one of: {', '.join(TRAIN_PRESETS)}") from None


def parse_run_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """--preset picks the defaults; every other flag overrides one field of it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    preset = "cpu-270m"
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
        elif arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
    base = train_preset(preset)
    with deferred_validation():
        cfg = tyro.cli(TrainConfig, default=base, args=argv)
    validate(cfg)
    return cfg
