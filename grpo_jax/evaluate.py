"""Held-out evaluation: `python -m grpo_jax.evaluate --run-dir DIR` (or --preset/--model ...).

Greedy answers to held-out problems, scored four ways (see `eval_metrics`):
format accuracy, exact accuracy (first number in <answer>), partial accuracy
(within 10%), and a lenient accuracy that ignores the format (last number
anywhere), for the base model and the trained one side by side. Writes eval.json
and prints a Markdown table.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

import jax
import tyro

from grpo_jax import data, eval_metrics, fileio, run_cli, runs, sampler
from grpo_jax import stop_strings as stop_strings_lib
from grpo_jax.config import ModelConfig, SamplerConfig, TrainConfig


def evaluate_model(params, lora, tokenizer, problems: Sequence[data.Problem],
                   model_cfg: ModelConfig, *, max_new_tokens: int, stop_ids: tuple[int, ...],
                   batch_size: int = 16, prompt_bucket: int = 32, prompt_style: str = "chat",
                   prefill: str = "", stop_strings: tuple[str, ...] = ()
                   ) -> tuple[dict, list[dict]]:
    """Greedy completions for `problems` -> (summary figures, per-problem records);
    a completion is scored and recorded with the `prefill` its prompt ends with."""
    sampling = SamplerConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=stop_ids,
                             prompt_bucket=prompt_bucket, stop_strings=stop_strings)
    stop_table = stop_strings_lib.stop_table(tokenizer, stop_strings, model_cfg.vocab_size)
    completions = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        out = sampler.sample_prompts(params, data.encode_prompts(tokenizer, chunk,
                                                                 prompt_style, prefill),
                                     jax.random.key(0), cfg=model_cfg, sampling=sampling,
                                     lora=lora, stop_table=stop_table)
        completions += [prefill + c for c in
                        sampler.decode_completions(tokenizer, out, stop_strings)]
    answers = [p.answer for p in problems]
    scores = eval_metrics.eval_scores(completions, answers)
    records = [{"index": p.index, "template": p.template, "question": p.question,
                "answer": p.answer, "completion": c,
                **{k: bool(v[i]) for k, v in scores.items()}}
               for i, (p, c) in enumerate(zip(problems, completions))]
    return eval_metrics.summarize(scores), records


def eval_problems(cfg: TrainConfig) -> list[data.Problem]:
    """The run's held-out problems (disjoint from its training questions)."""
    return data.load_problems(cfg.data, "eval")[:cfg.eval_problems]


def eval_options(cfg: TrainConfig) -> dict:
    """evaluate_model's keyword arguments as the run config sets them."""
    return dict(max_new_tokens=cfg.eval_max_new_tokens, stop_ids=cfg.sampler.stop_ids,
                prompt_bucket=cfg.sampler.prompt_bucket, batch_size=cfg.eval_batch_size,
                prompt_style=cfg.data.prompt_style, prefill=cfg.data.prefill,
                stop_strings=cfg.sampler.stop_strings)


def evaluate_run(cfg: TrainConfig, model_cfg: ModelConfig, params, tokenizer, lora,
                 out_dir: Path, *, step: int, problems: Sequence[data.Problem] | None = None
                 ) -> dict:
    """Base and trained (checkpoint `step`) side by side on the held-out problems
    (default: cfg.eval_problems of them) -> eval.json, written atomically."""
    problems = eval_problems(cfg) if problems is None else problems
    base, base_records = evaluate_model(params, None, tokenizer, problems, model_cfg,
                                        **eval_options(cfg))
    trained, trained_records = evaluate_model(params, lora, tokenizer, problems, model_cfg,
                                              **eval_options(cfg))
    result = {"base": base, "trained": trained, "num_problems": len(problems), "step": step,
              "dataset": cfg.data.eval_dataset or cfg.data.dataset}
    runs.write_eval(out_dir, {**result, "records": {"base": base_records,
                                                    "trained": trained_records}})
    print(eval_metrics.format_table({"base": base, "trained": trained}))
    return result


@dataclasses.dataclass(frozen=True)
class EvaluateArgs:
    """Evaluate the base model and a trained run on held-out problems."""

    run_dir: Path
    """A training run's --output-dir (its config.json and latest checkpoint are used)."""
    num_problems: int | None = None
    """Held-out problems to evaluate (default: the run's eval_problems)."""
    step: int | None = None
    """Checkpoint step to evaluate (default: the newest that verifies)."""
    dataset: str | None = None
    """Held-out dataset override: gsm_symbolic, gsm8k, or a local file."""
    max_new_tokens: int | None = None
    """Answer budget override."""


def main(argv: Sequence[str] | None = None) -> int:
    args = tyro.cli(EvaluateArgs, args=argv)
    return run_cli(lambda: evaluate_run_dir(args))


def evaluate_run_dir(args: EvaluateArgs) -> dict:
    """Base vs the run's checkpoint, with the overrides in `args` -> eval.json."""
    cfg = runs.run_config(args.run_dir)
    if args.num_problems is not None and args.num_problems <= 0:
        raise ValueError(f"--num-problems must be positive, got {args.num_problems}")
    num_problems = args.num_problems or cfg.eval_problems
    if not num_problems:
        raise ValueError(f"{args.run_dir} was trained with --eval-problems 0; pass "
                         "--num-problems N")
    cfg = dataclasses.replace(
        cfg, eval_problems=num_problems,
        eval_max_new_tokens=args.max_new_tokens or cfg.eval_max_new_tokens,
        data=dataclasses.replace(cfg.data, eval_dataset=args.dataset or cfg.data.eval_dataset))
    # Every cheap check before the slow base load: checkpoints, problems, eval.json.
    runs.checkpoint_steps(args.run_dir, cfg, args.step)
    problems = eval_problems(cfg)
    fileio.check_writable(args.run_dir)
    base = runs.load_run_base(cfg)
    lora, step = runs.restore_lora(args.run_dir, cfg, base.cfg, args.step)
    return evaluate_run(cfg, base.cfg, base.params, base.tokenizer, lora, args.run_dir,
                        step=step, problems=problems)


if __name__ == "__main__":
    sys.exit(main())
