"""What every step of a training phase shares, passed as one object instead of ten
arguments: the run's config, the model config and tokenizer, the phase's compiled
programs, its problems, the run's fixed widths, the mesh and the sampling stream."""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax

from grpo_jax import sharding
from grpo_jax.config import TrainConfig
from grpo_jax.model.config import ModelConfig
from grpo_jax.update import StepFunctions


class RunShapes(NamedTuple):
    """The padded widths every step of a run uses, fixed from its training problems at
    the start, so each phase compiles its programs once: with widths bucketed per
    batch, a 30-step SFT phase met 10 (prompt, target) shapes and compiled its update
    10 times (~40 s each on 2 cores, as long as the step itself)."""

    prompt_len: int      # prompts (with the prefill) left-padded to this, in both phases
    sft_target_len: int  # SFT targets (with their stop token) right-padded to this
    # Packed SFT (sft.pack_length > 0): rows per step and target slots per row, the
    # most any step of the run needs.
    sft_rows: int = 0
    sft_targets: int = 0


@dataclasses.dataclass(frozen=True)
class StepContext:
    cfg: TrainConfig
    model_cfg: ModelConfig
    tokenizer: Any
    fns: StepFunctions              # the phase's log-prob pass and update
    problems: Sequence[Any]         # the phase's problems (data.Problem), in stream order
    shapes: RunShapes
    plan: sharding.MeshPlan         # the run's mesh (one device: sharding.local_plan())
    sampling_key: jax.Array | None = None  # GRPO: step k samples with fold_in(key, k)
    stop_table: Any = None          # GRPO: the stop strings' automaton, built once
    toolbox: Any = None             # GRPO with sampler.tools: tools.Toolbox, built once
