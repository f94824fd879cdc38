"""`--dtype auto`: the compute dtype this machine runs the model's matmuls fastest in.

The three kinds of 2-core CPU this project meets disagree: with AVX-512 BF16, XLA's
bfloat16 matmul is ~2x its float32; on AVX2 only and on AMX machines (whose matrix
units XLA:CPU leaves idle) bfloat16 is slower than float32. So the choice is measured,
not assumed: a few jitted matmuls at the model's own shapes, timed in both dtypes,
once per machine (the answer is kept beside the compilation cache). Accelerators
compute bfloat16 natively and skip the probe.

Only the base model's compute and storage dtype follow the choice: LoRA weights,
optimizer state, log-softmax, losses and advantages stay float32 (the logits come
out of their matmul in float32), and the sampler and the trainer share the dtype, so
their log-probs stay comparable.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from grpo_jax.fileio import atomic_write_text
from grpo_jax.model.config import DTYPE_CHOICES, ModelConfig

log = logging.getLogger("grpo_jax")

AUTO = DTYPE_CHOICES[0]
CANDIDATES = ("float32", "bfloat16")
# bfloat16 must beat float32 by this much to be chosen: it costs precision, so a
# near tie goes to float32 (probe noise on a loaded machine is ~5-10%).
MIN_SPEEDUP = 1.15
CACHE_FILE = "grpo_jax_dtype_choice.json"
# Rows of the probe's projections: an update's micro-batch of tokens is hundreds of
# rows; a decode step's logits are a batch of rows against the whole vocabulary.
PROJECTION_ROWS = 512
DECODE_ROWS = 16
LOGIT_COLUMNS = 65_536


def probe_shapes(cfg: ModelConfig) -> tuple[tuple[int, int, int], ...]:
    """(m, k, n) of the matmuls that dominate the model's time: the MLP's projections
    and a slice of the tied logits. Each accumulates into float32, as the model's
    one matmul (`grpo_jax.model.matmul`) does: XLA:CPU's bfloat16 matmul with a bfloat16
    result is no faster than float32 even where its float32-accumulating one is 2x."""
    d, f = cfg.embed_dim, cfg.ffw_dim
    return ((PROJECTION_ROWS, d, f), (PROJECTION_ROWS, f, d),
            (DECODE_ROWS, d, min(cfg.vocab_size, LOGIT_COLUMNS)))


def time_matmuls(dtype: str, shapes, repeats: int = 5) -> float:
    """Seconds for one pass over `shapes` in `dtype` (each matmul's best of `repeats`)."""
    mm = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    total = 0.0
    for i, (m, k, n) in enumerate(shapes):
        a = jax.random.normal(jax.random.key(2 * i), (m, k), dtype)
        b = jax.random.normal(jax.random.key(2 * i + 1), (k, n), dtype)
        jax.block_until_ready(mm(a, b))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(mm(a, b))
            best = min(best, time.perf_counter() - start)
        total += best
    return total


# The CPU flags that decide XLA's (and oneDNN's) matmul paths.
MATMUL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_identity() -> tuple[str, tuple[str, ...]]:
    """(CPU model name, which of MATMUL_FLAGS it has), from /proc/cpuinfo where there is one."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                cpu = value.strip()
            elif name.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return cpu, tuple(f for f in MATMUL_FLAGS if f in flags)


def machine_key(cfg: ModelConfig) -> str:
    """What the answer depends on: the CPU (model and the flags that decide the matmul
    paths), the cores this process may use, the jax version and the model's shapes."""
    cpu, isa = cpu_identity()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    shapes = "x".join(f"{m}.{k}.{n}" for m, k, n in probe_shapes(cfg))
    return f"{cpu}|{'+'.join(isa)}|{cores} cores|jax {jax.__version__}|{shapes}"


def cache_path() -> Path | None:
    """The answers' file, beside the compilation cache (None: no cache in use)."""
    directory = jax.config.jax_compilation_cache_dir
    return Path(directory) / CACHE_FILE if directory else None


def _read_cache(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # unreadable: probe again and write it anew
    return cached if isinstance(cached, dict) else {}


def choose(rates: dict[str, float]) -> str:
    """bfloat16 when its matmul rate beats float32's by MIN_SPEEDUP, else float32."""
    return "bfloat16" if rates["bfloat16"] >= MIN_SPEEDUP * rates["float32"] else "float32"


def fastest_dtype(cfg: ModelConfig, *, timer: Callable[[str, tuple], float] | None = None,
                  backend: str | None = None) -> str:
    """The compute dtype for `--dtype auto` on this machine, logged in one line.
    timer: seconds for (dtype, shapes); `time_matmuls` looked up at call time."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        log.info("dtype auto: bfloat16 (native on %s)", backend)
        return "bfloat16"
    path, key = cache_path(), machine_key(cfg)
    cached = _read_cache(path)
    entry = cached.get(key)
    if isinstance(entry, dict) and entry.get("dtype") in CANDIDATES and isinstance(
            entry.get("gflops"), dict):
        source = f"cached in {path}"
    else:
        shapes = probe_shapes(cfg)
        flops = sum(2.0 * m * k * n for m, k, n in shapes)
        timer = timer or time_matmuls
        gflops = {d: flops / timer(d, shapes) / 1e9 for d in CANDIDATES}
        entry = {"dtype": choose(gflops), "gflops": gflops}
        source = "probed now"
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps({**cached, key: entry}, indent=1))
            except OSError as e:  # a read-only cache costs a probe per start, nothing else
                log.info("dtype auto: could not keep the choice (%s)", e)
    rates = ", ".join(f"{d} {entry['gflops'][d]:.0f}" for d in CANDIDATES
                      if d in entry["gflops"])
    log.info("dtype auto: %s (matmul GFLOP/s at the model's shapes: %s; %s)",
             entry["dtype"], rates, source)
    return entry["dtype"]


def resolve(dtype: str | None, cfg: ModelConfig) -> str | None:
    """`dtype` as given, or the measured choice when it is "auto"."""
    return fastest_dtype(cfg) if dtype == AUTO else dtype
