"""The reference figure for one GRPO training step: Hugging Face TRL's `GRPOTrainer`
on the job this project benchmarks, on this machine's CPUs.

    python benchmarks/trl_step_reference.py --dtype bfloat16 --json

The job (the defaults): the embedded Gemma 3 270M GGUF (dequantized by transformers
into --dtype), --prompts short math word problems each sampled --group times
(`num_generations`) at temperature 1.0 for exactly --completion-len tokens (EOS is
suppressed with `generation_kwargs={"min_new_tokens": ...}`, so every completion runs
the full length), LoRA rank --lora-rank (alpha 16) on the q, k, v, o, gate, up and
down projections via peft, KL beta 0.04 against the base model (TRL runs the
reference pass with the adapter disabled), learning rate 1e-5 (constant), AdamW,
one optimizer step per generation batch (`per_device_train_batch_size` = prompts x
group, no gradient accumulation, `num_iterations=1`), CPU only, no reporting,
logging or checkpoints, a fixed seed.

A step is everything between the trainer's `on_step_begin` and `on_step_end`
callbacks: generation, rewards, the reference log-probs, the loss, backward, gradient
clipping and the optimizer step (the data loader's fetch of the prompt strings,
before `on_step_begin`, is not counted). One warm-up step runs first and is not
timed; then --steps timed steps, each reported, with the best and the mean.

The reward (its value does not change the work done): 1.0 when the last number in
the completion equals the problem's answer, else 0.0.

The script departs from TRL's defaults on purpose: `gradient_checkpointing` is off
(TRL turns it on by default; this project does not rematerialize; --gradient-checkpointing
restores TRL's default), `bf16` follows --dtype (TRL defaults it to on), and
`mask_truncated_completions` stays off (every completion hits the length limit).
transformers dequantizes the GGUF into plain dense modules but still marks the model
GGUF-quantized, which `Trainer` refuses to train; the script checks the weights are
dense in --dtype and drops that mark (`unmark_gguf_quantized`). In bfloat16,
transformers' warning about "weights packed" GGUF kernels does not apply to Gemma 3
(that check confirms it); peft keeps the LoRA weights in float32 (reported as
lora_dtype), with bf16=True turning on the trainer's bf16 mixed precision.

Needs the `reference` extra plus TRL: pip install trl peft (tried with trl 1.16.0,
peft 0.21.2, transformers 5.25.0, torch 2.13.0+cpu).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import statistics
import sys
import tempfile
import time

import tyro

# (problem, answer): the dataset cycles through these for --prompts rows.
PROBLEMS = [
    ("Tom has 3 boxes with 12 apples in each box. He gives away 7 apples. How many apples does he have left?", 29),
    ("A train travels 60 kilometres per hour for 2.5 hours. How many kilometres does it travel?", 150),
    ("Sara buys 4 notebooks at 3 dollars each and a pen for 2 dollars. How many dollars does she spend?", 14),
    ("A class of 28 students splits into teams of 4. How many teams are there?", 7),
    ("A baker makes 45 rolls and sells two thirds of them. How many rolls are left?", 15),
    ("Ben reads 18 pages a day. How many pages does he read in 2 weeks?", 252),
    ("A rectangle is 9 metres long and 6 metres wide. What is its area in square metres?", 54),
    ("Mia had 50 dollars, spent 17 on a book and then earned 12. How many dollars does she have now?", 45),
]
PROMPT_TEMPLATE = "Solve the problem and end with the final number.\nQuestion: {}\nAnswer:"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass(frozen=True)
class Args:
    """Time one GRPO step of TRL's GRPOTrainer on this project's benchmark job."""

    dtype: str = "float32"
    """float32 or bfloat16: the weights' and the compute's dtype (bfloat16 also sets bf16=True)."""
    steps: int = 2
    """Timed steps, after one untimed warm-up step."""
    prompts: int = 4
    """Distinct prompts per step."""
    group: int = 4
    """Completions per prompt (num_generations, at least 2)."""
    completion_len: int = 128
    """Tokens per completion (max_completion_length; EOS suppressed until then)."""
    lora_rank: int = 16
    lora_alpha: int = 16
    beta: float = 0.04
    learning_rate: float = 1e-5
    seed: int = 0
    threads: int = 0
    """torch intra-op threads (0: torch's default)."""
    gradient_checkpointing: bool = False
    """TRL's default is on; off matches this project's update."""
    json: bool = False


def check(args: Args) -> None:
    if args.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype {args.dtype!r}: choose float32 or bfloat16")
    if args.group < 2:
        raise ValueError(f"--group {args.group}: GRPO needs at least 2 completions per prompt")
    for name in ("steps", "prompts", "completion_len", "lora_rank", "threads"):
        low = 0 if name == "threads" else 1
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least {low}")


def final_number_reward(completions, answer, completion_ids, **kwargs):
    """1.0 when the completion's last number equals the answer, else 0.0. Records
    the completion lengths of this generation batch (one call per step)."""
    lengths = [len(ids) for ids in completion_ids]
    final_number_reward.lengths.append(lengths)
    rewards = []
    for text, want in zip(completions, answer):
        numbers = re.findall(r"-?\d+(?:\.\d+)?", text)
        rewards.append(1.0 if numbers and float(numbers[-1]) == float(want) else 0.0)
    return rewards


final_number_reward.lengths = []


def unmark_gguf_quantized(model, dtype) -> None:
    """transformers loads Gemma 3 from a GGUF by dequantizing every tensor into
    `dtype` (its legacy GGUF path: plain dense modules), yet still marks the model as
    GGUF-quantized, and `Trainer` refuses to train a GGUF-quantized model. Check that
    the weights really are dense, then drop the mark."""
    packed = [type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()
              or "ggml" in type(m).__name__.lower()]
    odd = sorted({str(p.dtype) for p in model.parameters() if p.dtype != dtype})
    if packed or odd:
        raise RuntimeError(f"the GGUF model is not dense in {dtype}: modules {sorted(set(packed))}, dtypes {odd}")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def run(args: Args) -> dict:
    import datasets
    import peft
    import torch
    import transformers
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_jax.model.load import embedded_gguf_path

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    path = embedded_gguf_path()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    unmark_gguf_quantized(model, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    load_seconds = time.perf_counter() - start

    rows = [PROBLEMS[i % len(PROBLEMS)] for i in range(args.prompts)]
    dataset = datasets.Dataset.from_list(
        [{"prompt": PROMPT_TEMPLATE.format(q), "answer": a} for q, a in rows])
    prompt_tokens = [len(tokenizer(p)["input_ids"]) for p in dataset["prompt"]]

    rows_per_step = args.prompts * args.group
    out_dir = tempfile.TemporaryDirectory(prefix="trl_step_reference_")
    # transformers 5.x renamed gradient_checkpointing (TRL's default: on) to activation_checkpointing.
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    checkpointing = {"activation_checkpointing" if "activation_checkpointing" in names
                     else "gradient_checkpointing": args.gradient_checkpointing}
    config = GRPOConfig(
        output_dir=out_dir.name,  # nothing is saved; removed at the end
        use_cpu=True,
        bf16=args.dtype == "bfloat16",
        seed=args.seed,
        max_steps=1 + args.steps,
        per_device_train_batch_size=rows_per_step,  # one optimizer step per generation batch
        gradient_accumulation_steps=1,
        num_generations=args.group,
        num_iterations=1,
        max_completion_length=args.completion_len,
        generation_kwargs={"min_new_tokens": args.completion_len},  # no EOS before the limit
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=args.beta,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        **checkpointing,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                      target_modules=LORA_TARGETS, task_type="CAUSAL_LM")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begins, self.ends = [], []

        def on_step_begin(self, *a, **k):
            self.begins.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())

    timer = StepTimer()
    final_number_reward.lengths.clear()
    # Anything the trainer prints goes to stderr, so that stdout holds only the result.
    with contextlib.redirect_stdout(sys.stderr):
        trainer = GRPOTrainer(model=model, reward_funcs=final_number_reward, args=config,
                              train_dataset=dataset, processing_class=tokenizer,
                              peft_config=lora, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        try:
            trainer.train()
        finally:
            out_dir.cleanup()

    seconds = [e - b for b, e in zip(timer.begins, timer.ends)]
    if len(seconds) != 1 + args.steps or len(final_number_reward.lengths) != 1 + args.steps:
        raise RuntimeError(f"expected {1 + args.steps} steps, timed {len(seconds)} and scored "
                           f"{len(final_number_reward.lengths)} generation batches")
    timed = seconds[1:]
    lengths = final_number_reward.lengths[1:]
    tokens = [sum(step) for step in lengths]
    lora_param = next(p for n, p in trainer.model.named_parameters() if "lora_A" in n)
    return {
        "impl": "trl.GRPOTrainer",
        "trl": trl.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": args.dtype, "bf16": config.bf16, "lora_dtype": str(lora_param.dtype).removeprefix("torch."),
        "attn_implementation": trainer.model.config._attn_implementation,
        "optim": getattr(config.optim, "value", str(config.optim)),
        "gradient_checkpointing": config.gradient_checkpointing,
        "prompts": args.prompts, "group": args.group, "rows_per_step": rows_per_step,
        "completion_len": args.completion_len, "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
        "trainable_params": trainable, "beta": args.beta, "learning_rate": args.learning_rate,
        "prompt_tokens": prompt_tokens,
        "warmup_seconds": seconds[0], "step_seconds": timed,
        "best_seconds": min(timed), "mean_seconds": statistics.fmean(timed),
        "completion_tokens_per_step": tokens,
        "completion_len_min": min(min(step) for step in lengths),
        "completion_len_max": max(max(step) for step in lengths),
        "completion_tokens_per_s_best": max(t / s for t, s in zip(tokens, timed)),
        "timing": "on_step_begin to on_step_end callbacks, after 1 warm-up step",
        "load_seconds": load_seconds,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    args = tyro.cli(Args, args=argv)
    try:
        check(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        import peft  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        print("error: trl is not installed (pip install trl peft)", file=sys.stderr)
        return 2
    result = run(args)
    print(json.dumps(result) if args.json else result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
