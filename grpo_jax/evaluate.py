"""Held-out evaluation: `python -m grpo_jax.evaluate --run-dir DIR` (or --preset/--model ...).

Greedy answers to held-out problems, scored four ways (see `eval_metrics`):
format accuracy, exact accuracy (first number in <answer>), partial accuracy
(within 10%), and a lenient accuracy that ignores the format (last number
anywhere), for the base model and the trained one side by side. Writes eval.json
and prints a Markdown table.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

import jax

from grpo_jax import data, eval_metrics, sampler
from grpo_jax.config import ModelConfig, SamplerConfig, TrainConfig


def evaluate_model(params, lora, tokenizer, problems: Sequence[data.Problem],
                   model_cfg: ModelConfig, *, max_new_tokens: int, stop_ids: tuple[int, ...],
                   batch_size: int = 16, prompt_bucket: int = 32) -> tuple[dict, list[dict]]:
    """Greedy completions for `problems` -> (summary figures, per-problem records)."""
    sampling = SamplerConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=stop_ids,
                             prompt_bucket=prompt_bucket)
    completions = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        out = sampler.sample_prompts(params, data.encode_prompts(tokenizer, chunk),
                                     jax.random.key(0), cfg=model_cfg, sampling=sampling,
                                     lora=lora)
        completions += sampler.decode_completions(tokenizer, out)
    answers = [p.answer for p in problems]
    scores = eval_metrics.eval_scores(completions, answers)
    records = [{"index": p.index, "question": p.question, "answer": p.answer, "completion": c,
                **{k: bool(v[i]) for k, v in scores.items()}}
               for i, (p, c) in enumerate(zip(problems, completions))]
    return eval_metrics.summarize(scores), records


def evaluate_run(cfg: TrainConfig, model_cfg: ModelConfig, params, tokenizer, lora,
                 out_dir: Path) -> dict:
    """Base and trained side by side on cfg.eval_problems held-out problems -> eval.json."""
    problems = data.load_problems(cfg.data, "eval")[:cfg.eval_problems]
    kwargs = dict(max_new_tokens=cfg.eval_max_new_tokens, stop_ids=cfg.sampler.stop_ids,
                  prompt_bucket=cfg.sampler.prompt_bucket, batch_size=cfg.eval_batch_size)
    base, base_records = evaluate_model(params, None, tokenizer, problems, model_cfg, **kwargs)
    trained, trained_records = evaluate_model(params, lora, tokenizer, problems, model_cfg,
                                              **kwargs)
    result = {"base": base, "trained": trained, "num_problems": len(problems),
              "dataset": cfg.data.eval_dataset or cfg.data.dataset}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(
        {**result, "records": {"base": base_records, "trained": trained_records}}, indent=1))
    print(eval_metrics.format_table({"base": base, "trained": trained}))
    return result


@dataclasses.dataclass(frozen=True)
class EvaluateArgs:
    """Evaluate the base model and a trained run on held-out problems."""

    run_dir: Path
    """A training run's --output-dir (its config.json and latest checkpoint are used)."""
    num_problems: int | None = None
    """Held-out problems to evaluate (default: the run's eval_problems)."""
    dataset: str | None = None
    """Held-out dataset override: gsm_symbolic, gsm8k, or a local file."""
    max_new_tokens: int | None = None
    """Answer budget override."""


def _run_config(run_dir: Path) -> TrainConfig:
    from grpo_jax.config import config_from_dict

    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training run's output dir?")
    return config_from_dict(TrainConfig, json.loads(path.read_text()))


def main(argv: Sequence[str] | None = None) -> int:
    import tyro

    args = tyro.cli(EvaluateArgs, args=argv)
    from grpo_jax.checkpoint import Checkpointer, CheckpointMismatch
    from grpo_jax.model import lora as lora_lib
    from grpo_jax.train import load_base, make_optimizer, num_updates

    try:
        cfg = _run_config(args.run_dir)
        cfg = dataclasses.replace(
            cfg, eval_problems=args.num_problems or cfg.eval_problems,
            eval_max_new_tokens=args.max_new_tokens or cfg.eval_max_new_tokens,
            data=dataclasses.replace(cfg.data, eval_dataset=args.dataset or cfg.data.eval_dataset))
        model_cfg, params, tokenizer = load_base(cfg)
        template = lora_lib.init_lora(model_cfg, cfg.lora, jax.random.key(0))
        ckpt = Checkpointer(args.run_dir, fingerprint=cfg.fingerprint)
        opt_template = make_optimizer(cfg.optimizer, num_updates(cfg)).init(template)
        restored = ckpt.restore_latest({"lora": template, "opt_state": opt_template})
        if restored is None:
            raise FileNotFoundError(f"no checkpoint in {args.run_dir}")
        evaluate_run(cfg, model_cfg, params, tokenizer, restored.state["lora"], args.run_dir)
    except (ValueError, FileNotFoundError, CheckpointMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
