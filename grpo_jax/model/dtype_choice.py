"""`--dtype auto`: the compute dtype (and matmul kernel) this machine runs the model's
matmuls fastest in.

The three kinds of 2-core CPU this project meets disagree: with AVX-512 BF16, XLA's
bfloat16 matmul is ~2x its float32; on AVX2 only and on AMX machines (whose matrix
units XLA:CPU leaves idle) bfloat16 is slower than float32. So the choice is measured,
not assumed: a few jitted matmuls at the model's own shapes, timed in both dtypes,
once per machine (the answer is kept beside the compilation cache). Accelerators
compute bfloat16 natively and skip the probe. Where oneDNN's bfloat16 matmul can run
(grpo_jax/kernels/cpu/: built on first use), it is a third candidate: on AMX CPUs it
reaches matrix units XLA:CPU uses only in part.

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
from grpo_jax.kernels.cpu import onednn
from grpo_jax.model.config import DTYPE_CHOICES, MATMUL_CHOICES, ModelConfig
from grpo_jax.model.matmul import matmul

log = logging.getLogger("grpo_jax")

AUTO = DTYPE_CHOICES[0]
ONEDNN = "bfloat16+onednn"
# In order of preference on a tie: each later one must beat the one chosen so far.
CANDIDATES = ("float32", "bfloat16", ONEDNN)
# A later candidate must beat the choice so far by this much. bfloat16 costs
# precision, so a near tie keeps float32 (probe noise on a loaded machine is ~5-10%).
MIN_SPEEDUP = 1.15
# oneDNN computes the same bf16 x bf16 -> f32 products as XLA's bfloat16 dot, but a
# probe lead does not carry over to a run in full: its custom calls cost XLA fusions
# and share the cores with XLA's threads. On an AMX machine a lead of 1.15-1.21 at the
# probe's shapes became a GRPO step 10% slower than XLA's (34.6 against 31.5 s, once
# the backward ran in bf16; docs/perf/README.md, session 6). So it must lead by more.
MIN_SPEEDUP_SAME_DTYPE = 1.3
CACHE_FILE = "grpo_jax_dtype_choice.json"
# Rows of the probe's matmuls: an update's micro-batch is a thousand tokens and more;
# a decode step's logits are a batch of rows against the whole vocabulary.
PROJECTION_ROWS = 1024
DECODE_ROWS = 16
LOGIT_COLUMNS = 65_536


def probe_shapes(cfg: ModelConfig) -> tuple[tuple[int, int, int, str], ...]:
    """(m, k, n, einsum) of the matmuls that dominate the model's time, each in the
    model's own layout: the MLP's projections (weights [k, n]) and a slice of the tied
    logits (embedding [n, k]) at an update's rows, and a decode step's logits slice,
    vocabulary-major as the sampler computes them. Each accumulates into float32, as
    the model's one matmul (`grpo_jax.model.matmul`) does: XLA:CPU's bfloat16 matmul
    with a bfloat16 result is no faster than float32 even where its
    float32-accumulating one is 2x. Layout and rows matter on AMX: oneDNN led XLA's
    bf16 on the update's logits 542 to 441 GFLOP/s at 1,024 rows with the embedding
    [n, k] and trailed 422 to 446 with it [k, n]; a probe at 512 rows and plain
    layouts chose XLA though the update ran 1.5x faster on oneDNN."""
    d, f = cfg.embed_dim, cfg.ffw_dim
    logits = min(cfg.vocab_size, LOGIT_COLUMNS)
    return ((PROJECTION_ROWS, d, f, "mk,kn->mn"), (PROJECTION_ROWS, f, d, "mk,kn->mn"),
            (PROJECTION_ROWS, d, logits, "mk,nk->mn"), (DECODE_ROWS, d, logits, "mk,nk->nm"))


def split(candidate: str) -> tuple[str, str]:
    """A candidate's (compute dtype, matmul implementation)."""
    return ("bfloat16", "onednn") if candidate == ONEDNN else (candidate, "xla")


def candidate_of(cfg: ModelConfig) -> str:
    """The probe's name for how `cfg` multiplies (its dtype and matmul implementation)."""
    return ONEDNN if cfg.matmul_impl == "onednn" and cfg.dtype == "bfloat16" else cfg.dtype


def runnable_candidates() -> tuple[str, ...]:
    """The candidates this process can run: oneDNN's only where it builds and runs."""
    return CANDIDATES if onednn.unavailable() is None else CANDIDATES[:2]


def time_matmuls(candidate: str, shapes, repeats: int = 5) -> float:
    """Seconds for one pass over `shapes` ((m, k, n) or (m, k, n, einsum), default
    "mk,kn->mn") by `candidate` (each matmul's best of `repeats`)."""
    dtype, impl = split(candidate)
    total = 0.0
    for i, (m, k, n, *layout) in enumerate(shapes):
        equation = layout[0] if layout else "mk,kn->mn"
        mm = jax.jit(lambda a, b, eq=equation: matmul(eq, a, b, dtype, jnp.float32, impl=impl))
        a = jax.random.normal(jax.random.key(2 * i), (m, k), dtype)
        b_shape = (n, k) if equation.split("->")[0].endswith("nk") else (k, n)
        b = jax.random.normal(jax.random.key(2 * i + 1), b_shape, dtype)
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


def machine_key(cfg: ModelConfig, candidates: tuple[str, ...] = CANDIDATES[:2]) -> str:
    """What the answer depends on: the CPU (model and the flags that decide the matmul
    paths), the cores this process may use, the jax version, the model's shapes and
    the candidates timed."""
    cpu, isa = cpu_identity()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    shapes = "x".join(f"{m}.{k}.{n}.{eq}" for m, k, n, eq in probe_shapes(cfg))
    key = f"{cpu}|{'+'.join(isa)}|{cores} cores|jax {jax.__version__}|{shapes}"
    return key if candidates == CANDIDATES[:2] else f"{key}|{','.join(candidates)}"


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
    """The candidate chosen from measured rates: each in CANDIDATES order replaces the
    choice so far when its rate beats that one's by MIN_SPEEDUP (another dtype) or
    MIN_SPEEDUP_SAME_DTYPE (oneDNN over XLA, both bfloat16)."""
    best = "float32"
    for candidate in CANDIDATES[1:]:
        same = split(candidate)[0] == split(best)[0]
        margin = MIN_SPEEDUP_SAME_DTYPE if same else MIN_SPEEDUP
        if candidate in rates and rates[candidate] >= margin * rates[best]:
            best = candidate
    return best


def fastest(cfg: ModelConfig, *, timer: Callable[[str, tuple], float] | None = None,
            backend: str | None = None, onednn_allowed: bool = True) -> tuple[str, str]:
    """(compute dtype, matmul implementation) for `--dtype auto` on this machine, logged
    in one line. timer: seconds for (candidate, shapes); `time_matmuls` looked up at
    call time. oneDNN is timed where it is allowed and can run here."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        log.info("dtype auto: bfloat16 (native on %s)", backend)
        return "bfloat16", "xla"
    candidates, why_not = CANDIDATES[:2], None
    if onednn_allowed:
        why_not = onednn.unavailable()
        if why_not is None:
            candidates = CANDIDATES
    path, key = cache_path(), machine_key(cfg, candidates)
    cached = _read_cache(path)
    entry = cached.get(key)
    if isinstance(entry, dict) and entry.get("dtype") in candidates and isinstance(
            entry.get("gflops"), dict):
        # The rates are the measurement; the choice follows today's margins (a choice
        # cached under older ones picked oneDNN on an AMX machine at a 1.21x lead).
        entry = {**entry, "dtype": choose(entry["gflops"])}
        source = f"cached in {path}"
    else:
        shapes = probe_shapes(cfg)
        flops = sum(2.0 * m * k * n for m, k, n, *_ in shapes)
        timer = timer or time_matmuls
        gflops = {d: flops / timer(d, shapes) / 1e9 for d in candidates}
        entry = {"dtype": choose(gflops), "gflops": gflops}
        source = "probed now"
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps({**cached, key: entry}, indent=1))
            except OSError as e:  # a read-only cache costs a probe per start, nothing else
                log.info("dtype auto: could not keep the choice (%s)", e)
    rates = ", ".join(f"{d} {entry['gflops'][d]:.0f}" for d in candidates
                      if d in entry["gflops"])
    if why_not is not None:
        source += f"; oneDNN not timed: {why_not}"
    log.info("dtype auto: %s (matmul GFLOP/s at the model's shapes: %s; %s)",
             entry["dtype"], rates, source)
    return split(entry["dtype"])


def fastest_dtype(cfg: ModelConfig, **kwargs) -> str:
    """The compute dtype `fastest` chooses."""
    return fastest(cfg, **kwargs)[0]


def resolve(dtype: str | None, cfg: ModelConfig, matmul_impl: str = AUTO) -> tuple[str | None, str]:
    """(compute dtype, matmul implementation) for a run that asks for `dtype` (None:
    the model's own) and `matmul_impl` (auto: the probe's choice under `--dtype auto`,
    XLA's otherwise). An explicit onednn needs bfloat16 (or auto) and a machine that
    can run it: a clear error otherwise."""
    if matmul_impl not in MATMUL_CHOICES:
        raise ValueError(f"matmul implementation {matmul_impl!r}: choose one of "
                         f"{', '.join(MATMUL_CHOICES)}")
    if matmul_impl == "onednn":
        if dtype not in (AUTO, "bfloat16"):
            raise ValueError(f"--matmul onednn computes in bfloat16; --dtype {dtype} asks "
                             "otherwise (pass --dtype bfloat16 or auto)")
        why_not = onednn.unavailable()
        if why_not is not None:
            raise ValueError(f"--matmul onednn cannot run here: {why_not}")
        return "bfloat16", "onednn"
    if dtype == AUTO:
        return fastest(cfg, onednn_allowed=matmul_impl == AUTO)
    return dtype, "xla"
