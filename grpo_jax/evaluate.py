"""Held-out evaluation: `python -m grpo_jax.evaluate --run-dir DIR` (or --preset/--model ...).

Greedy answers to held-out problems, scored four ways (see `eval_metrics`):
format accuracy, exact accuracy (first number in <answer>), partial accuracy
(within 10%), and a lenient accuracy that ignores the format (last number
anywhere), each with its 95% Wilson interval, and the fraction of the arithmetic
steps written that are right (step_accuracy), for the base model, the SFT-only
model (runs with an SFT warm-up) and the trained policy side by side. Writes
eval.json (held-out templates) or eval_same_template.json, or with --num-problems
other than the run's own count eval[_same_template]_n<N>.json, and prints a
Markdown table.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Literal, Sequence

import jax
import tyro

from grpo_jax import data, eval_metrics, fileio, memory, runs, sampler, sharding
from grpo_jax import tools as tools_lib
from grpo_jax import stop_strings as stop_strings_lib
from grpo_jax.cli import run_cli
from grpo_jax.config import SamplerConfig, TrainConfig
from grpo_jax.model.config import ModelConfig
from grpo_jax.model import load

log = logging.getLogger(__name__)


def evaluate_model(params, lora, tokenizer, problems: Sequence[data.Problem],
                   model_cfg: ModelConfig, *, max_new_tokens: int, stop_ids: tuple[int, ...],
                   batch_size: int = 16, prompt_bucket: int = 32, prompt_style: str = "chat",
                   prefill: str = "", stop_strings: tuple[str, ...] = (),
                   plan: sharding.MeshPlan | None = None,
                   tools: SamplerConfig | None = None,
                   max_prompt_tokens: int | None = None) -> tuple[dict, list[dict]]:
    """Greedy completions for `problems` -> (summary figures, per-problem records);
    a completion is scored and recorded with the `prefill` its prompt ends with.
    plan: the mesh the weights live on (default one device); every host of a
    multi-host run calls this and gets the same results. tools: a sampler config
    whose tool (`tools`, markers and bounds) answers the model's calls; None: the model
    alone, writing its own results. max_prompt_tokens: as `DataConfig`'s."""
    sampling = SamplerConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=stop_ids,
                             prompt_bucket=prompt_bucket, stop_strings=stop_strings)
    sampling = with_tool(sampling, tools)
    stop_table = stop_strings_lib.stop_table(tokenizer, stop_strings, model_cfg.vocab_size)
    # Continuous batching: `batch_size` rows decode together and a row that stops takes
    # the next problem at once (greedy, so the answers equal batch-at-a-time decoding's).
    out = sampler.sample_stream(params, data.encode_prompts(tokenizer, problems, prompt_style,
                                                            prefill, max_prompt_tokens),
                                jax.random.key(0), cfg=model_cfg, sampling=sampling,
                                slots=batch_size, lora=lora, stop_table=stop_table, plan=plan,
                                toolbox=tools_lib.toolbox(tokenizer, sampling,
                                                          model_cfg.vocab_size))
    completions = [prefill + c for c in sampler.decode_completions(tokenizer, out, stop_strings)]
    answers = [p.answer for p in problems]
    scores = eval_metrics.eval_scores(completions, answers)
    steps = eval_metrics.step_counts(completions)
    records = [{"index": p.index, "template": p.template, "question": p.question,
                "answer": p.answer, "completion": c,
                **{k: bool(v[i]) for k, v in scores.items()},
                "steps_stated": steps[i].stated, "steps_right": steps[i].right,
                **({} if out.tool_calls is None else {"tool_calls": int(out.tool_calls[i])})}
               for i, (p, c) in enumerate(zip(problems, completions))]
    figures = eval_metrics.summarize(scores, steps)
    if out.tool_calls is not None:
        figures["tool_calls_mean"] = float(out.tool_calls.mean())
    return figures, records


# The sampler fields that say which tool answers calls, and how.
TOOL_FIELDS = ("tools", "tool_call", "max_tool_calls", "tool_result_tokens", "tool_timeout_s")


def tool_setup(sampling: SamplerConfig) -> dict:
    """The tool fields of `sampling` (a run's sampler config), by name."""
    return {f: getattr(sampling, f) for f in TOOL_FIELDS}


def with_tool(sampling: SamplerConfig, tools: SamplerConfig | None) -> SamplerConfig:
    """`sampling` answered by the tool `tools` names (None or no tool: unchanged)."""
    if tools is None or not tools.tools:
        return sampling
    return dataclasses.replace(sampling, **tool_setup(tools))


def sampled_accuracy(params, lora, tokenizer, problems: Sequence[data.Problem],
                     model_cfg: ModelConfig, *, k: int, temperature: float, key: jax.Array,
                     max_new_tokens: int, stop_ids: tuple[int, ...], batch_size: int = 16,
                     prompt_bucket: int = 32, prompt_style: str = "chat", prefill: str = "",
                     stop_strings: tuple[str, ...] = (),
                     plan: sharding.MeshPlan | None = None,
                     tools: SamplerConfig | None = None,
                     max_prompt_tokens: int | None = None) -> dict:
    """k samples per problem at `temperature` -> pass@k (the fraction of problems with at
    least one exact sample: what GRPO can amplify), the per-sample rates, their Wilson
    intervals, and how many problems had 0..k exact samples. tools: as in
    `evaluate_model`."""
    if k <= 0 or temperature <= 0:
        raise ValueError(f"pass@k needs k > 0 and a temperature > 0, got k={k}, "
                         f"temperature={temperature}")
    sampling = SamplerConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                             stop_ids=stop_ids, prompt_bucket=prompt_bucket,
                             stop_strings=stop_strings)
    sampling = with_tool(sampling, tools)
    stop_table = stop_strings_lib.stop_table(tokenizer, stop_strings, model_cfg.vocab_size)
    prompts = data.encode_prompts(tokenizer, problems, prompt_style, prefill, max_prompt_tokens)
    # Each problem k times in a row: every row draws from its own stream (its index).
    out = sampler.sample_stream(params, [p for p in prompts for _ in range(k)], key,
                                cfg=model_cfg, sampling=sampling, slots=batch_size,
                                lora=lora, stop_table=stop_table, plan=plan,
                                toolbox=tools_lib.toolbox(tokenizer, sampling,
                                                          model_cfg.vocab_size))
    completions = [prefill + c for c in sampler.decode_completions(tokenizer, out, stop_strings)]
    scores = eval_metrics.eval_scores(completions, [p.answer for p in problems
                                                    for _ in range(k)])
    exact = [sum(scores["exact"][i * k:(i + 1) * k]) for i in range(len(problems))]
    solved = sum(e > 0 for e in exact)
    per_sample = eval_metrics.summarize(scores, eval_metrics.step_counts(completions))
    return {"k": k, "temperature": temperature, "num_problems": len(problems),
            f"pass_at_{k}": solved / len(problems),
            f"pass_at_{k}_ci95": list(eval_metrics.wilson_interval(solved, len(problems))),
            "samples": per_sample,
            "exact_samples_per_problem": [exact.count(j) for j in range(k + 1)],
            "records": [{"index": p.index, "exact_samples": e,
                         "completions": completions[i * k:(i + 1) * k]}
                        for i, (p, e) in enumerate(zip(problems, exact))]}


def eval_problems(cfg: TrainConfig, split: str = "eval") -> list[data.Problem]:
    """The run's held-out problems (disjoint from its training questions)."""
    return data.held_out_problems(cfg.data, split, cfg.eval_problems)


def eval_options(cfg: TrainConfig) -> dict:
    """evaluate_model's keyword arguments as the run config sets them (the model alone:
    `tool_columns` adds the tool)."""
    return dict(max_new_tokens=cfg.eval_max_new_tokens, stop_ids=cfg.sampler.stop_ids,
                prompt_bucket=cfg.sampler.prompt_bucket, batch_size=cfg.eval_batch_size,
                prompt_style=cfg.data.prompt_style, prefill=cfg.data.prefill,
                stop_strings=cfg.sampler.stop_strings,
                # Only when set: evaluation files written before it existed keep their setup.
                **({} if cfg.data.max_prompt_tokens is None
                   else {"max_prompt_tokens": cfg.data.max_prompt_tokens}))


# eval.json's columns, in the order a run produces them, and their table labels. A run
# with a tool also fills COLUMN + TOOL_SUFFIX: the same model with the tool answering
# its calls. The plain columns are the model alone, the headline.
COLUMNS = ("base", "sft", "trained")
TOOL_SUFFIX = "_tool"


def tool_columns(cfg: TrainConfig) -> bool:
    """Whether the run's evaluation has a column with its tool beside each plain one."""
    return bool(cfg.sampler.tools)


def paired_comparisons(cfg: TrainConfig) -> tuple[tuple[str, str, str], ...]:
    """(key in the file, before, after) of each paired comparison an evaluation file
    records: SFT+GRPO against SFT-only (the model alone), and with a tool the trained
    policy with it against the same policy alone (what the tool adds)."""
    pairs = (("comparison", "sft", "trained"),)
    if tool_columns(cfg):
        pairs += (("comparison" + TOOL_SUFFIX, "trained", "trained" + TOOL_SUFFIX),)
    return pairs


def column_labels(cfg: TrainConfig) -> dict[str, str]:
    labels = {"base": "base", "sft": "SFT", "trained": "SFT+GRPO" if cfg.sft.steps else "GRPO"}
    if tool_columns(cfg):
        labels.update({c + TOOL_SUFFIX: f"{labels[c]} + {cfg.sampler.tools[0]}"
                       for c in COLUMNS})
    return labels


class EvalFile:
    """A run's eval.json, filled one column at a time as the run reaches it: the
    base model (before any step), SFT-only (at the SFT -> GRPO boundary), the
    trained policy (at the end). A column records its checkpoint step; columns of
    another evaluation setup (problems, budget, prompt) are dropped, not mixed.

    Layout: {"base"|"sft"|"trained": figures, "steps": {column: step}, "step": the
    trained column's step, "num_problems", "dataset", "split", "setup", "records"}.
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path, problems: Sequence[data.Problem],
                 split: str = "eval", name: str | None = None,
                 plan: sharding.MeshPlan | None = None):
        self.cfg, self.run_dir, self.problems = cfg, Path(run_dir), list(problems)
        self.plan = plan
        self.name = name or runs.eval_file(split)
        self.setup = {"dataset": cfg.data.eval_dataset or cfg.data.dataset, "split": split,
                      "num_problems": len(self.problems),
                      "indices": [p.index for p in self.problems],
                      **{k: v for k, v in eval_options(cfg).items() if k != "batch_size"}}
        if tool_columns(cfg):
            self.setup["tools"] = tool_setup(cfg.sampler)
        self.setup = json.loads(json.dumps(self.setup))  # tuples as lists, as read back
        self.path = self.run_dir / self.name
        saved = runs.read_eval(self.run_dir, self.name)
        self.result = saved if saved.get("setup") == self.setup else {}

    def ways(self, column: str) -> tuple[str, ...]:
        """The file's columns for model `column`: alone, and with the run's tool."""
        return (column, column + TOOL_SUFFIX) if tool_columns(self.cfg) else (column,)

    def is_current(self, column: str, step: int) -> bool:
        steps = self.result.get("steps", {})
        return all(steps.get(c) == step for c in self.ways(column))

    def add(self, column: str, step: int, params, lora, tokenizer, model_cfg: ModelConfig
            ) -> dict:
        """Evaluate (params, lora) greedily as `column` at checkpoint `step` (and with
        the run's tool, as column + TOOL_SUFFIX); write. -> the model-alone figures."""
        if column not in COLUMNS:
            raise ValueError(f"column must be one of {COLUMNS}, got {column!r}")
        r = self.result or {"setup": self.setup, "num_problems": len(self.problems),
                            "dataset": self.setup["dataset"], "split": self.setup["split"]}
        for name in self.ways(column):
            figures, records = evaluate_model(
                params, lora, tokenizer, self.problems, model_cfg, **eval_options(self.cfg),
                plan=self.plan, tools=self.cfg.sampler if name != column else None)
            r[name] = figures
            r.setdefault("steps", {})[name] = step
            r.setdefault("records", {})[name] = records
        r[runs.DATA_SOURCE_KEY] = data.source_versions(self.cfg.data)
        if column == "trained":
            r["step"] = step
        r.update({key: c for key, (c, _, _) in self.comparisons(r["records"]).items()})
        self.result = r
        if jax.process_index() == 0:  # every host computes the same figures
            runs.write_eval(self.run_dir, r, self.name)
        return r[column]

    def table(self) -> str:
        labels = column_labels(self.cfg)
        table = eval_metrics.format_table({labels[c]: self.result[c] for c in labels
                                           if c in self.result})
        lines = [eval_metrics.format_comparison(c, labels[before], labels[after]) for
                 c, before, after in self.comparisons(self.result.get("records", {})).values()]
        return "\n\n".join([table, *lines])

    def comparisons(self, records: dict) -> dict[str, tuple[dict, str, str]]:
        """{key: (comparison, before, after)} of paired_comparisons whose two columns
        `records` holds for the same problems."""
        out = {}
        for key, before, after in paired_comparisons(self.cfg):
            comparison = eval_metrics.compare_columns(records, before, after)
            if comparison is not None:
                out[key] = (comparison, before, after)
        return out


def evaluate_checkpoint(cfg: TrainConfig, run_dir: Path, problems: Sequence[data.Problem],
                        base: load.LoadedModel, adapters: runs.Adapters,
                        split: str = "eval", name: str | None = None,
                        columns: Sequence[str] = COLUMNS) -> dict:
    """Each of `columns` that checkpoint `adapters` can fill (base; SFT-only when the
    run has SFT; the trained policy when it reached GRPO). A column the file already
    holds for the same setup and step is kept, not recomputed (greedy decoding repeats
    it), so an evaluation that was stopped goes on where it was."""
    evals = EvalFile(cfg, run_dir, problems, split, name)
    model_cfg, params, tokenizer = base

    def add(column, step, params, lora):
        if column not in columns:
            return
        if evals.is_current(column, step):
            log.info("%s column (step %d) already in %s", column, step, evals.path)
        else:
            evals.add(column, step, params, lora, tokenizer, model_cfg)

    add("base", 0, params, None)
    if adapters.sft is not None:
        add("sft", adapters.step if adapters.grpo is None else cfg.sft.steps, params,
            adapters.sft)
    if adapters.grpo is not None:
        add("trained", adapters.step, *adapters.policy(params))
    print(evals.table())
    return evals.result


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
    split: str = "eval"
    """eval: templates held out of training (the headline; writes eval.json);
    eval_same_template: new problems of the training templates (eval_same_template.json).
    Datasets without templates (gsm8k, files) evaluate their test problems for both."""
    pass_at: int = 0
    """Instead of the greedy columns: K samples per problem at --temperature from the
    SFT-only and trained models -> pass@K (problems with at least one exact sample) and
    per-sample rates, written to pass_at_<K>[_<split>]_n<N>.json."""
    temperature: float = 1.0
    """Sampling temperature for --pass-at."""
    seed: int = 0
    """Sampling seed for --pass-at."""
    columns: tuple[Literal["base", "sft", "trained"], ...] = COLUMNS
    """The greedy columns to fill (the base model's never changes, and it is the
    slowest: it rarely stops before the answer budget)."""


def main(argv: Sequence[str] | None = None) -> int:
    args = tyro.cli(EvaluateArgs, args=argv)
    return run_cli(lambda: evaluate_run_dir(args))


def evaluate_run_dir(args: EvaluateArgs) -> dict:
    """Base, SFT-only and the run's checkpoint, with the overrides in `args` ->
    eval.json (or eval_same_template.json)."""
    cfg = runs.run_config(args.run_dir)
    if args.num_problems is not None and args.num_problems <= 0:
        raise ValueError(f"--num-problems must be positive, got {args.num_problems}")
    if not args.columns:
        raise ValueError(f"--columns needs at least one of {COLUMNS}")
    num_problems = args.num_problems or cfg.eval_problems
    if not num_problems:
        raise ValueError(f"{args.run_dir} was trained with --eval-problems 0; pass "
                         "--num-problems N")
    # Another count than the run's own goes to its own file: the run's eval.json
    # stays what its training wrote (and a restarted run does not redo it).
    name = runs.eval_file(args.split, None if num_problems == cfg.eval_problems
                          else num_problems)
    cfg = dataclasses.replace(
        cfg, eval_problems=num_problems,
        eval_max_new_tokens=args.max_new_tokens or cfg.eval_max_new_tokens,
        data=dataclasses.replace(cfg.data, eval_dataset=args.dataset or cfg.data.eval_dataset))
    # Every cheap check before the slow base load: checkpoints, problems, eval.json.
    runs.checkpoint_steps(args.run_dir, cfg, args.step)
    problems = eval_problems(cfg, args.split)
    fileio.check_writable(args.run_dir)
    base = runs.load_run_base(cfg)
    adapters = runs.restore_adapters(args.run_dir, cfg, base.cfg, args.step)
    if args.pass_at:
        return pass_at_k_columns(cfg, args, problems, base, adapters)
    return evaluate_checkpoint(cfg, args.run_dir, problems, base, adapters, args.split, name,
                               args.columns)


def pass_at_k_columns(cfg: TrainConfig, args: EvaluateArgs, problems, base: load.LoadedModel,
                      adapters: runs.Adapters) -> dict:
    """sampled_accuracy of the SFT-only and trained models (those the checkpoint has),
    each with the same sampling key, written and printed."""
    model_cfg, params, tokenizer = base
    columns = {}
    if adapters.sft is not None:
        columns["sft"] = (params, adapters.sft)
    if adapters.grpo is not None:
        columns["trained"] = adapters.policy(params)
    if tool_columns(cfg):  # each model alone, then with the run's tool
        columns.update({c + TOOL_SUFFIX: weights for c, weights in list(columns.items())})
    if not columns:
        raise ValueError(f"{args.run_dir} has no trained adapters to sample from")
    options = eval_options(cfg)
    result = {"setup": {"indices": [p.index for p in problems], "split": args.split,
                        "seed": args.seed, **json.loads(json.dumps(options))},
              "steps": {"sft": cfg.sft.steps, "trained": adapters.step}}
    if tool_columns(cfg):
        result["setup"]["tools"] = tool_setup(cfg.sampler)
    name = f"pass_at_{args.pass_at}" + ("" if args.split == "eval" else f"_{args.split}") \
        + f"_n{len(problems)}.json"
    for column, (p, lora) in columns.items():
        result[column] = sampled_accuracy(p, lora, tokenizer, problems, model_cfg,
                                          k=args.pass_at, temperature=args.temperature,
                                          key=jax.random.key(args.seed), plan=None,
                                          tools=cfg.sampler if column.endswith(TOOL_SUFFIX)
                                          else None, **options)
        if jax.process_index() == 0:
            runs.write_eval(args.run_dir, result, name)
        figures = result[column]
        print(f"{column}: pass@{args.pass_at} {figures[f'pass_at_{args.pass_at}']:.1%} "
              f"({', '.join(f'{x:.1%}' for x in figures[f'pass_at_{args.pass_at}_ci95'])}), "
              f"exact per sample {figures['samples']['exact_accuracy']:.1%}, format per "
              f"sample {figures['samples']['format_accuracy']:.1%} "
              f"-> {args.run_dir / name}")
    return result


if __name__ == "__main__":
    memory.keep_freed_memory()  # restarts the process once (grpo_jax/memory.py)
    sys.exit(main())
