"""Sample completions from the command line.

    python -m grpo_jax.generate --prompts-file prompts.jsonl --max-new-tokens 64 --json

Each line of the prompts file is a JSON object with a "prompt" string. With
--json, stdout carries one JSON object per prompt, in order:
{"prompt_ids", "completion_ids", "completion", "logprobs"}; logprobs[i] is the
float32 log-softmax (temperature 1, full vocabulary) of completion_ids[i].
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

import jax
import tyro

from grpo_jax import memory, tools
from grpo_jax.cli import run_cli
from grpo_jax.config import SamplerConfig
from grpo_jax.model.load import load_model
from grpo_jax.sampler import sample_prompts
from grpo_jax.stop_strings import cut_after_stop, stop_table
from grpo_jax.tokenizer import STOP_IDS, chat_prompt


class PromptFileError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class GenerateArgs:
    """Generate completions with Gemma 3."""

    model: str | None = None
    """Model preset (gemma3-270m, gemma3-1b, gemma3-4b, tiny). Default: the embedded
    gemma3-270m, or the architecture in the --gguf file."""
    checkpoint: Path | None = None
    """Orbax (Kaggle Flax) or Hugging Face safetensors checkpoint for --model."""
    gguf: Path | None = None
    """A GGUF file instead of --model's weights; it carries its own tokenizer."""
    tokenizer: Path | None = None
    """A sentencepiece tokenizer.model (default: from the GGUF, or beside the checkpoint)."""
    prompts_file: Path | None = None
    """JSON lines, one {"prompt": "..."} object per line."""
    prompt: tuple[str, ...] = ()
    """Prompt text given inline (repeatable); used after --prompts-file's prompts."""
    chat: bool = False
    """Wrap each prompt in the Gemma user turn (<start_of_turn>user ... <start_of_turn>model)."""
    max_new_tokens: int = 128
    """Generation stops at EOS / <end_of_turn> (included in the output) or after this many."""
    temperature: float = 0.0
    """0 = greedy decoding."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: no limit)."""
    top_p: float = 1.0
    """Nucleus sampling threshold in (0, 1]."""
    stop_strings: tuple[str, ...] = ()
    """Text that ends a completion once written (e.g. '</answer>'), even mid-token;
    the completion is cut after it."""
    tools: tuple[str, ...] = ()
    """A tool that answers the model's calls as it writes (`calculator`: `<<28*4=` is
    answered `112>>`)."""
    seed: int = 0
    """PRNG seed for temperature > 0."""
    batch_size: int = 8
    """Prompts decoded together."""
    dtype: str | None = None
    """Compute dtype: float32, bfloat16, or auto (the faster on this machine, measured);
    unset: the model's own (float32)."""
    matmul: str = "auto"
    """Matmuls: xla, onednn (bfloat16 through oneDNN) or auto (the probe's choice under
    --dtype auto, XLA's otherwise)."""
    json: bool = False
    """One JSON object per prompt on stdout instead of readable text."""


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise PromptFileError(f"prompts file not found: {path}")
    prompts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise PromptFileError(f"{path}:{lineno}: expected an object with a \"prompt\" string")
        prompts.append(row["prompt"])
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts (one {{\"prompt\": ...}} object per line)")
    return prompts


def sampler_config(args: GenerateArgs):
    try:
        return SamplerConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, stop_ids=STOP_IDS,
                             stop_strings=args.stop_strings, tools=args.tools)
    except ValueError as e:  # name the flag, not the field
        field = str(e).split()[0]
        raise ValueError(f"--{field.replace('_', '-')}{str(e)[len(field):]}") from None


def validate(args: GenerateArgs) -> None:
    sampler_config(args)
    for name in args.tools:
        tools.get_tool(name)
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.prompts_file is None and not args.prompt:
        raise ValueError("no prompts: pass --prompts-file FILE or --prompt TEXT")


def run(args: GenerateArgs) -> list[dict]:
    validate(args)
    sampling = sampler_config(args)
    texts = (read_prompts(args.prompts_file) if args.prompts_file else []) + list(args.prompt)
    loaded = load_model(args.model, checkpoint=args.checkpoint, gguf=args.gguf,
                        tokenizer=args.tokenizer, dtype=args.dtype, matmul=args.matmul)
    tok = loaded.tokenizer
    encoded = [tok.encode(chat_prompt(t) if args.chat else t, add_bos=True) for t in texts]
    key = jax.random.key(args.seed)
    table = stop_table(tok, sampling.stop_strings, loaded.cfg.vocab_size)
    box = tools.toolbox(tok, sampling, loaded.cfg.vocab_size)
    results = []
    for start in range(0, len(encoded), args.batch_size):
        batch = encoded[start:start + args.batch_size]
        out = sample_prompts(loaded.params, batch, jax.random.fold_in(key, start),
                             cfg=loaded.cfg, sampling=sampling, stop_table=table,
                             toolbox=box)
        out_tokens, out_lp, lengths = out.tokens, out.logprobs, out.lengths
        for row, prompt_ids in enumerate(batch):
            n = int(lengths[row])
            ids = out_tokens[row, :n].tolist()
            text_ids = ids[:-1] if ids and ids[-1] in STOP_IDS else ids
            results.append({"prompt_ids": list(prompt_ids), "completion_ids": ids,
                            "completion": cut_after_stop(tok.decode(text_ids),
                                                         sampling.stop_strings),
                            "logprobs": [float(x) for x in out_lp[row, :n]],
                            **({} if out.tool_calls is None else
                               {"tool_calls": int(out.tool_calls[row])})})
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = tyro.cli(GenerateArgs, args=argv)
    return run_cli(lambda: print_results(run(args), as_json=args.json))


def print_results(results: Sequence[dict], *, as_json: bool) -> None:
    for r in results:
        if as_json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            print(r["completion"])
            print("-" * 40)


if __name__ == "__main__":
    memory.keep_freed_memory()  # restarts the process once (grpo_jax/memory.py)
    sys.exit(main())
