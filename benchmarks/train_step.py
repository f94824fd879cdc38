"""Time of GRPO's teacher-forced passes: the reference log-probs and the update.

    python benchmarks/train_step.py --prompts 2 --group 4 --prompt-len 192 \
        --completion-len 192 --json
    python benchmarks/train_step.py ... --no-share-prompt   # one prompt copy per row

The batch is what a training step sees: `--prompts` random prompts (BOS first),
each repeated for its `--group` rows, and full-length random completions (every
position real, so runs are comparable). Reports compile time and the best of
`--repeats` runs of the reference pass (LoRA off) and of the update (`update.build_update`: the
loss, LoRA gradients and AdamW update), the model FLOPs of the tokens they
process beside this machine's measured float32 matmul rate, the update's compiled
temp memory, and the process's peak RSS. Prints JSON with --json.
"""
from __future__ import annotations

import dataclasses
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.config import GRPOConfig, OptimizerConfig
from grpo_jax.model.config import LoraConfig
from grpo_jax.model import dtype_choice, lora as lora_lib
from grpo_jax.update import Batch, build_update
from grpo_jax.tokenizer import BOS_ID

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_costs import model_flops_per_token  # noqa: E402
from sampler_throughput import (best_time, cli_main, load_params,  # noqa: E402
                                machine_facts)


@dataclasses.dataclass(frozen=True)
class Args:
    """Benchmark the reference log-prob pass and the GRPO update."""

    model: str = "gemma3-270m"
    """Preset: gemma3-270m loads the embedded weights; others use random weights."""
    dtype: str = "auto"
    """Compute dtype: float32, bfloat16, or auto (the faster on this machine, as a run's)."""
    matmul: str = "auto"
    """Matmuls: xla, onednn, or auto (the probe's choice under --dtype auto, as a run's)."""
    prompts: int = 2
    """Distinct prompts (B)."""
    group: int = 4
    """Completions per prompt (G)."""
    prompt_len: int = 192
    completion_len: int = 192
    share_prompt: bool = True
    """Pack each prompt once per group (grpo.share_prompt)."""
    micro_batch: int = 0
    """Rows per gradient micro-batch (0: all)."""
    lora_rank: int = 16
    repeats: int = 2
    """Timed runs after compilation; the fastest is reported."""
    seed: int = 0
    json: bool = False
    """Print one JSON object instead of a readable summary."""


def run(args: Args) -> dict:
    if min(args.prompts, args.prompt_len, args.completion_len, args.repeats) <= 0:
        raise ValueError("--prompts, --prompt-len, --completion-len and --repeats must be "
                         "positive")
    grpo_cfg = GRPOConfig(num_prompts=args.prompts, group_size=args.group,
                          micro_batch=args.micro_batch, share_prompt=args.share_prompt)
    opt_cfg = OptimizerConfig()
    machine = machine_facts()
    cfg, params = load_params(args.model, args.dtype, args.matmul)
    rates = machine["matmul_gflops"]
    # The path's own 2048^3 rate, and the machine's best of all paths measured.
    matmul_flops = 1e9 * rates.get(dtype_choice.candidate_of(cfg), rates["float32"])
    best_flops = 1e9 * max(rates.values())
    fns = build_update(cfg, grpo_cfg, opt_cfg, total_updates=10)
    lora = lora_lib.init_lora(cfg, LoraConfig(rank=args.lora_rank, alpha=float(args.lora_rank)),
                              jax.random.key(args.seed))
    state = fns.init_state(lora)
    rng = np.random.default_rng(args.seed)
    n = args.prompts * args.group
    prompts = rng.integers(3, cfg.vocab_size, (args.prompts, args.prompt_len), dtype=np.int32)
    prompts[:, 0] = BOS_ID
    tokens = jnp.asarray(np.concatenate(
        [np.repeat(prompts, args.group, axis=0),
         rng.integers(3, cfg.vocab_size, (n, args.completion_len), dtype=np.int32)], axis=1))
    batch = Batch(tokens=tokens, input_mask=jnp.ones(tokens.shape, bool),
                  advantages=jnp.asarray(rng.standard_normal(n), jnp.float32),
                  prompt_len=args.prompt_len)

    inputs = (batch.tokens, batch.input_mask)
    start = time.perf_counter()
    ref_c = fns.logprobs.lower(params, None, *inputs, batch.prompt_len).compile()
    batch = batch.replace(ref_logprobs=ref_c(params, None, *inputs))
    step_c = fns.update.lower(params, state, batch).compile()
    compile_s = time.perf_counter() - start
    ref_s, _ = best_time(lambda: ref_c(params, None, *inputs), args.repeats)
    # The update donates its state: hand it a fresh copy each time.
    update_s, _ = best_time(lambda: step_c(params, jax.tree.map(jnp.copy, state), batch),
                            args.repeats)

    # The work a step needs, counted one prompt copy per row (what the update computes
    # without sharing): layers for every token, logits for completion positions only.
    context = (args.prompt_len + args.completion_len) / 2
    length = args.prompt_len + args.completion_len
    layer_flops = n * length * model_flops_per_token(cfg, context, logits=False)
    logit_flops = n * args.completion_len * 2.0 * cfg.vocab_size * cfg.embed_dim
    forward_flops = layer_flops + logit_flops
    # The update: the layers forward and backward (activation gradients only: the
    # base is frozen, LoRA's own gradients are rank-sized); the logit chunks forward,
    # again in the backward (rematerialised), and their gradient to the hidden states.
    update_flops = 2 * layer_flops + 3 * logit_flops
    memory = step_c.memory_analysis()
    return {
        "model": cfg.name, "dtype": cfg.dtype, "matmul": cfg.matmul_impl, "prompts": args.prompts, "group": args.group,
        "prompt_len": args.prompt_len, "completion_len": args.completion_len,
        "share_prompt": args.share_prompt, "micro_batch": args.micro_batch,
        "lora_rank": args.lora_rank,
        "compile_s": compile_s, "reference_s": ref_s, "update_s": update_s,
        "update_tokens_per_s": n * length / update_s,
        "machine": machine,
        "model_gflops": {"reference": forward_flops / 1e9, "update": update_flops / 1e9},
        # Shared prompts do less than this work for the same result, so their
        # figure can pass what the machine's matmul rate allows unshared.
        "reference_utilization_of_matmul": forward_flops / ref_s / matmul_flops,
        "update_utilization_of_matmul": update_flops / update_s / matmul_flops,
        "reference_utilization_of_best_matmul": forward_flops / ref_s / best_flops,
        "update_utilization_of_best_matmul": update_flops / update_s / best_flops,
        "memory": {
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "update_temp_gb": memory.temp_size_in_bytes / 2 ** 30,
        },
    }


def main(argv=None) -> int:
    return cli_main(Args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
