"""`python -m grpo_jax.dry_run [--preset ...]` (or `train --dry-run`): compile a run's programs for its
mesh on abstract shapes (no weights loaded) and report per-chip memory, FLOPs, bytes
and the roofline time they imply.

With PyPI's `libtpu` installed (`pip install -e ".[tpu-aot]"`), the programs compile for
compile-only TPU devices of `--topology` (default v5e:2x4, a TPU v5e-8) on any machine:
the figures are the TPU compiler's own. Without it they compile for this machine's CPU
devices (JAX_NUM_CPU_DEVICES=8 simulates 8) and are labelled CPU figures.

Programs: the GRPO update (the whole batch, its micro-batch scan included), the
reference log-prob pass, the sampler's prefill and its decode loop, and one decode step
as a program of its own. XLA's cost analysis counts a while loop's body once, so the
decode loop's FLOPs and bytes are those of one step (plus its small prologue): the
per-token figure the estimates use. The standalone step is a cross-check; it can
cost more than the loop's body, whose invariant work the compiler hoists or fuses (for
Gemma 3 1B on data 8 it copies the 604 MB embedding, which the loop fuses away).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from grpo_jax import decode, presets, sampling, sharding, update
from grpo_jax.cli import run_cli
from grpo_jax.config import TrainConfig
from grpo_jax.model.config import ATTENTION_IMPLS, ModelConfig, model_preset
from grpo_jax.model import dtype_choice, gemma3, kv_cache, lora as lora_lib
from grpo_jax.model.load import with_dtype
from grpo_jax.sampler import bucket_length

# Prompt width the dry run compiles for: GSM8K prompts in the chat template fit in 256
# tokens (the sampler pads to a multiple of prompt_bucket).
PROMPT_LEN = 256


def prompt_len(cfg: TrainConfig) -> int:
    """PROMPT_LEN, or the width a run's `data.max_prompt_tokens` bounds its prompts to."""
    if cfg.data.max_prompt_tokens is None:
        return PROMPT_LEN
    return min(PROMPT_LEN, bucket_length(cfg.data.max_prompt_tokens, cfg.sampler.prompt_bucket))


@dataclasses.dataclass(frozen=True)
class Chip:
    """Peak figures of one chip (public datasheets), for the roofline."""

    name: str
    bf16_flops: float   # FLOP/s
    hbm_bandwidth: float  # bytes/s
    hbm_bytes: float


CHIPS = {
    "v5e": Chip("TPU v5e", 197e12, 819e9, 16 * 2**30),
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 95 * 2**30),
    "v4": Chip("TPU v4", 275e12, 1228e9, 32 * 2**30),
    "v6e": Chip("TPU v6e", 918e12, 1640e9, 32 * 2**30),
}


class DryRunError(ValueError):
    pass


def topology_devices(topology: str) -> tuple[list, Chip]:
    """Compile-only TPU devices of `topology` ("v5e:2x4"), or DryRunError in one line."""
    kind, _, shape = topology.partition(":")
    if kind not in CHIPS or not shape:
        raise DryRunError(f"--topology {topology!r}: expected one of "
                          f"{', '.join(k + ':AxB' for k in CHIPS)} (e.g. v5e:2x4)")
    try:
        dims = [int(d) for d in shape.split("x")]
    except ValueError:
        raise DryRunError(f"--topology {topology!r}: the shape must be like 2x4") from None
    from jax.experimental import topologies

    # libtpu takes a machine-wide lock on load, meant for processes sharing real chips;
    # compile-only devices share nothing, so a second compiling process may load it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    per_host = tuple(min(2, d) for d in dims) + (1,) * (3 - len(dims))
    try:
        topo = topologies.get_topology_desc(
            platform="tpu", topology_name=topology, chip_config_name="default",
            chips_per_host_bounds=per_host, num_slices=1, wrap=(False,) * 3)
    except Exception as e:  # noqa: BLE001 - libtpu's own message, in one line
        text = " ".join(str(e).split())[:200]
        raise DryRunError(f"--topology {topology!r}: libtpu cannot compile for it ({text})"
                          ) from None
    return list(topo.devices), CHIPS[kind]


def has_libtpu() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def run_model_config(cfg: TrainConfig) -> ModelConfig:
    # No probe here: the programs are compiled (for a TPU, where "auto" is bfloat16),
    # not run, and a run's mesh check needs only the shapes.
    dtype = "bfloat16" if cfg.dtype == dtype_choice.AUTO else cfg.dtype
    return dataclasses.replace(with_dtype(model_preset(cfg.model), dtype, "xla"),
                               attention_impl=cfg.attention)


PROGRAMS = ("update", "reference", "prefill", "decode", "decode_step")


def loop_free(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the update's micro-batch scan and the log-prob chunk loop one
    iteration long. XLA's cost analysis counts a loop's body once, whatever its trip
    count, so FLOPs and bytes of the update and reference pass come from these twins
    (same arithmetic, one iteration); their memory comes from the real programs."""
    g = cfg.grpo
    whole = g.batch_size * cfg.sampler.max_new_tokens
    return dataclasses.replace(cfg, grpo=dataclasses.replace(g, micro_batch=0,
                                                             logprob_chunk=whole))


def programs(cfg: TrainConfig, model_cfg: ModelConfig, plan: sharding.MeshPlan,
             names: tuple[str, ...] = PROGRAMS) -> dict:
    """{name: lowered program} of the run's jitted pieces on abstract inputs."""
    g = cfg.grpo
    n, steps = g.batch_size, cfg.sampler.max_new_tokens
    fns = update.build_update(model_cfg, g, cfg.optimizer, cfg.total_updates,
                              cfg.sampler.temperature, update.GRPOLoss(g), plan)
    params = gemma3.abstract_params(model_cfg)
    lora = lora_lib.abstract_lora(model_cfg, cfg.lora)
    state = jax.eval_shape(fns.init_state, lora)
    width = prompt_len(cfg)
    length = width + steps
    rows = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    logp = rows((n, steps), jnp.float32)
    batch = update.Batch(
        tokens=rows((n, length), jnp.int32), input_mask=rows((n, length), jnp.bool_),
        advantages=rows((n,), jnp.float32), ref_logprobs=logp if g.beta > 0 else None,
        old_logprobs=logp if g.num_iterations > 1 else None, sample_logprobs=logp,
        prompt_len=width)
    out = {}
    if "update" in names:
        out["update"] = fns.update.lower(params, state, batch)
    if "reference" in names:
        out["reference"] = fns.logprobs.lower(params, None, batch.tokens, batch.input_mask,
                                              width)
    engine = decode.programs(model_cfg, cfg.sampler, length, g.group_size, plan)
    prompts = rows((g.num_prompts, width), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    if "prefill" in names:  # the engine's start: prefill, fan-out, first tokens
        out["prefill"] = engine.start.lower(params, lora, prompts, rows(prompts.shape, jnp.bool_),
                                            rows((g.num_prompts,), jnp.int32), key, None,
                                            None)
    cache = kv_cache.abstract_cache(model_cfg, n, length)
    if "decode" in names:
        state = jax.eval_shape(
            lambda k: decode.empty_rows(cfg.sampler, jax.random.split(k, n)), key)
        out["decode"] = engine.decode.lower(params, lora, cache, state, rows((n,), jnp.bool_),
                                            rows((), jnp.int32), None, None)
    if "decode_step" not in names:
        return out

    def one_step(params, lora, cache, token):
        hidden, cache = kv_cache.decode_step(params, cache, token, model_cfg, lora)
        return sampling.vocab_major_logits(params, hidden, model_cfg), cache

    cache_sh = kv_cache.cache_shardings(plan, model_cfg)
    step_program = sharding.sharded_jit(
        plan, one_step, lambda p, lo, *_: (
            (gemma3.param_shardings(plan, model_cfg),
             lora_lib.lora_shardings(plan, model_cfg, lo), cache_sh, plan.rows),
            (plan.sharding((None, "batch")), cache_sh)),
        donate_argnums=(2,))
    out["decode_step"] = step_program.lower(params, lora, cache, rows((n,), jnp.int32))
    return out


def figures(compiled, chip: Chip | None) -> dict[str, Any]:
    """Per-chip memory (bytes) and cost of a compiled program, and its roofline time."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    temp, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
    row = {"arguments": args, "outputs": outs, "temporaries": temp, "aliased": alias,
           "peak": args + outs + temp - alias,
           "flops": float(cost.get("flops", 0.0)),
           "bytes_accessed": float(cost.get("bytes accessed", 0.0))}
    if chip is not None:
        compute = row["flops"] / chip.bf16_flops
        memory = row["bytes_accessed"] / chip.hbm_bandwidth
        row.update(roofline_s=max(compute, memory),
                   bound="compute" if compute >= memory else "memory")
    return row


def dry_run(cfg: TrainConfig, topology: str = "v5e:2x4", names: tuple[str, ...] = PROGRAMS,
            cost_twins: bool = True, compare: tuple[str, ...] = ATTENTION_IMPLS) -> dict:
    """Compile the run's programs (`names`) for its mesh; print and return the figures.
    cost_twins: take the update's and reference pass's FLOPs and bytes from their
    `loop_free` twins (two more compiles); without, those two count one loop iteration.
    compare: attention implementations compiled and reported beside the run's own."""
    model_cfg = run_model_config(cfg)
    if has_libtpu():
        # A compile-only device's executable cannot be loaded back: keep the CLIs'
        # persistent compilation cache out of it (each entry would only warn on read).
        jax.config.update("jax_enable_compilation_cache", False)
        devices, chip = topology_devices(topology)
        if cfg.mesh.size < len(devices):  # a smaller mesh on the topology's first chips
            devices = devices[:cfg.mesh.size]
        target = f"{topology} ({chip.name}, compile-only: the TPU compiler's figures)"
    else:
        devices, chip = jax.devices(), None
        target = (f"{len(devices)} {devices[0].platform.upper()} devices (no libtpu: CPU "
                  "figures, not a TPU's; pip install -e '.[tpu-aot]' for those)")
        if len(devices) < cfg.mesh.size:
            raise DryRunError(f"the mesh needs {cfg.mesh.size} devices and this process has "
                              f"{len(devices)}; install libtpu (.[tpu-aot]) or set "
                              f"JAX_NUM_CPU_DEVICES={cfg.mesh.size}")
        devices = devices[:cfg.mesh.size]
    sharding.check_run(cfg, model_cfg, len(devices))
    plan = sharding.MeshPlan(sharding.make_mesh(cfg.mesh, devices))
    report = {"target": target, "preset": cfg.preset, "model": model_cfg.name,
              "dtype": model_cfg.dtype, "mesh": dataclasses.asdict(cfg.mesh),
              "prompt_len": prompt_len(cfg), "max_new_tokens": cfg.sampler.max_new_tokens,
              "batch": {"prompts": cfg.grpo.num_prompts, "group": cfg.grpo.group_size,
                        "micro_batch": cfg.grpo.micro_batch},
              "attention": cfg.attention, "by_attention": {}}
    # The run's own attention first; its figures are also the report's top level. On
    # CPU devices a Pallas TPU kernel is interpreted: only the run's own is compiled.
    impls = (cfg.attention, *compare) if chip is not None else (cfg.attention,)
    for impl in dict.fromkeys(impls):
        impl_cfg = dataclasses.replace(cfg, attention=impl)
        progs = compile_programs(impl_cfg, run_model_config(impl_cfg), plan, chip, names,
                                 cost_twins)
        entry = {"programs": progs}
        if chip is not None and cost_twins and set(PROGRAMS) <= set(names):
            entry["estimates"] = estimates(cfg, progs)
        report["by_attention"][impl] = entry
    report.update(report["by_attention"][cfg.attention])
    if chip is not None:
        report["chip"] = dataclasses.asdict(chip)
    print(format_report(report))
    return report


def compile_programs(cfg: TrainConfig, model_cfg: ModelConfig, plan: sharding.MeshPlan,
                     chip: Chip | None, names: tuple[str, ...], cost_twins: bool) -> dict:
    """{program: figures} for one configuration (see `dry_run`)."""
    out = {}
    for name, lowered in programs(cfg, model_cfg, plan, names).items():
        start = time.perf_counter()
        out[name] = figures(lowered.compile(), chip)
        out[name]["compile_s"] = time.perf_counter() - start
    if cost_twins:
        twins = [n for n in ("update", "reference") if n in names]
        for name, lowered in programs(loop_free(cfg), model_cfg, plan, twins).items():
            cost = figures(lowered.compile(), chip)
            out[name].update({k: cost[k] for k in ("flops", "bytes_accessed", "roofline_s",
                                                   "bound") if k in cost})
    return out


def estimates(cfg: TrainConfig, progs: dict) -> dict:
    """A GRPO step's roofline time from the compiled figures: prefill, max_new_tokens
    decode steps (the decode loop's cost: its body counted once), the reference pass
    (beta > 0) and mu updates."""
    g = cfg.grpo
    decode = progs["decode"]["roofline_s"]
    step = (progs["prefill"]["roofline_s"] + cfg.sampler.max_new_tokens * decode
            + (progs["reference"]["roofline_s"] if g.beta > 0 else 0.0)
            + g.num_iterations * progs["update"]["roofline_s"])
    return {"decode_tokens_per_s": g.batch_size / decode, "step_s": step}


def format_report(report: dict) -> str:
    gib = 2.0 ** 30
    lines = [f"dry run: {report['preset']} ({report['model']}, {report['dtype']}) on "
             f"{report['target']}", f"mesh {report['mesh']}, prompts {report['prompt_len']} tokens + "
             f"{report['max_new_tokens']} new, batch {report['batch']}",
             f"{'program':<12}{'args':>9}{'outputs':>9}{'temp':>9}{'peak':>9}  (GiB per chip)"
             f"{'TFLOP':>9}{'GB moved':>10}{'roofline':>12}"]
    for impl, entry in report["by_attention"].items():
        own = impl == report["attention"] and len(report["by_attention"]) > 1
        lines.append(f"attention {impl}" + (" (the run's own)" if own else "") + ":")
        for name, row in entry["programs"].items():
            roof = (f"{row['roofline_s'] * 1e3:9.2f} ms {row['bound'][0]}"
                    if "roofline_s" in row else "")
            lines.append(f"  {name:<10}{row['arguments'] / gib:9.2f}{row['outputs'] / gib:9.2f}"
                         f"{row['temporaries'] / gib:9.2f}{row['peak'] / gib:9.2f}{'':15}"
                         f"{row['flops'] / 1e12:9.3f}{row['bytes_accessed'] / 1e9:10.2f}{roof}")
        if "estimates" in entry:
            e = entry["estimates"]
            lines.append(f"  roofline: decode {e['decode_tokens_per_s']:,.0f} tokens/s for the "
                         f"batch; a GRPO step {e['step_s']:.2f} s (compiled estimates, not "
                         "measurements)")
    if "pallas" in report["by_attention"]:
        lines.append("  (pallas: the kernels' FLOPs and bytes are their own estimates from "
                     "their block schedule; XLA cannot see inside a kernel)")
    return "\n".join(lines)


def write_report(report: dict, path: str) -> None:
    from grpo_jax.fileio import atomic_write_text
    atomic_write_text(path, json.dumps(report, indent=1))



# ---------------------------------------------------------------------------
# CLI: python -m grpo_jax.dry_run [--topology T] [--dry-run-json F]
#      [--dry-run-attention IMPL ...] [any train flag]

def _options_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m grpo_jax.dry_run", add_help=False,
        description="Compile a run's programs for its mesh on abstract shapes (no weights "
                    "loaded) and print per-chip memory, FLOPs, bytes and roofline times; for "
                    "--topology's TPU when libtpu is installed (.[tpu-aot]), else for this "
                    "machine's CPU devices. Nothing is trained or written. Every train flag "
                    "(--preset, --mesh.*, ...) sets the run compiled.")
    parser.add_argument("--topology", default="v5e:2x4",
                        help="TPU topology to compile for (v5e:2x4 is a TPU v5e-8)")
    parser.add_argument("--dry-run-json", default=None, metavar="FILE",
                        help="also write the figures to this JSON file")
    parser.add_argument("--dry-run-attention", nargs="*", default=list(ATTENTION_IMPLS),
                        choices=ATTENTION_IMPLS, metavar="IMPL",
                        help="attention implementations compiled beside the run's own "
                             f"(--attention); of {', '.join(ATTENTION_IMPLS)}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _options_parser()
    if {"-h", "--help"} & set(argv):
        parser.print_help()
        print("\nThe run's own flags (python -m grpo_jax.train --help):")
    options, run_argv = parser.parse_known_args(argv)

    def body():
        cfg = presets.parse_run_config(run_argv)
        report = dry_run(cfg, options.topology, compare=tuple(options.dry_run_attention))
        if options.dry_run_json:
            write_report(report, options.dry_run_json)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
