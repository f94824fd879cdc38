"""The reference figure: Hugging Face `transformers` greedy `generate` on the same job
as `sampler_throughput.py` (embedded Gemma 3 270M GGUF, random prompts of
--prompt-len tokens, --new-tokens generated with EOS ignored), on this machine, in
--dtype float32 or bfloat16 (which of them torch runs faster differs by CPU).

    python benchmarks/hf_generate_reference.py --batch 64 --dtype bfloat16 --json

Needs the `reference` extra (torch, transformers).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import numpy as np
import tyro


@dataclasses.dataclass(frozen=True)
class Args:
    """Time transformers' greedy generate on the sampler benchmark's job."""

    batch: int = 64
    prompt_len: int = 64
    new_tokens: int = 128
    dtype: str = "float32"
    """float32 or bfloat16: the weights' and the compute's dtype."""
    seed: int = 0
    threads: int = 0
    """torch intra-op threads (0: torch's default)."""
    json: bool = False


def run(args: Args) -> dict:
    if args.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype {args.dtype!r}: choose float32 or bfloat16")
    import torch
    from transformers import AutoModelForCausalLM

    from grpo_jax.model.load import embedded_gguf_path

    if args.threads:
        torch.set_num_threads(args.threads)
    path = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=getattr(torch, args.dtype)).eval()
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(3, model.config.vocab_size, (args.batch, args.prompt_len))
    ids[:, 0] = 2
    prompt = torch.tensor(ids)
    kwargs = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                  pad_token_id=0, attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        model.generate(prompt[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        start = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        seconds = time.perf_counter() - start
    generated = (out.shape[1] - args.prompt_len) * args.batch
    return {"impl": "transformers.generate", "dtype": args.dtype, "batch": args.batch, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "generated_tokens": generated, "seconds": seconds,
            "tokens_per_s": generated / seconds, "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    args = tyro.cli(Args, args=argv)
    try:
        result = run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
