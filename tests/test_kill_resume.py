"""Acceptance: a training run killed with SIGKILL at random points (one of them inside
a checkpoint write) and restarted with the same --output-dir continues from its last
complete checkpoint and ends exactly where an uninterrupted run with the same seed ends.

Everything goes through the CLI, as a user would run it. The killed run is started
three or more times:

1. fresh; SIGKILL the moment orbax's temporary directory of a randomly chosen step
   appears under checkpoints/ (the kill lands inside the write; asserted);
2. restarted; once it has completed a step past its resume point, SIGKILL after a
   uniformly random delay;
3. restarted; runs to the end.

After every kill the latest complete checkpoint is restored (on a copy of the
directory: opening a Checkpointer cleans up leftover temporary directories, and the
restart itself must cope with them). At the end, metrics.jsonl and samples.jsonl hold
steps 1..N exactly once, every step's metrics match the uninterrupted run within
1e-5, and so do the final LoRA weights and optimizer state.

Legitimate configuration only, chosen to keep this quick and meaningful on 2 CPU cores:
a local file of short problems (prompts fit one 512 bucket, so one set of programs is
compiled), a learning rate of 1e-2 (the random tiny model earns a constant reward, so
only the KL term moves the adapters; at the default rate the differences a broken
resume causes would be close to the 1e-5 tolerance), and a persistent JAX compilation
cache shared by the runs (the reference run compiles, restarts reuse its programs).

The kill points come from random.Random(seed); the seed is printed and shown in
failures. Reproduce with GRPO_KILL_RESUME_SEED=<seed>.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from grpo_jax import presets, runs, train
from grpo_jax.checkpoint import Checkpointer
from grpo_jax.model.config import model_preset
from grpo_jax.metrics import read_metrics
from grpo_jax.model import lora as lora_lib
from grpo_jax.update import make_optimizer

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
KEYS = ("reward/mean", "loss", "kl", "completion_len/mean", "format_rate", "grad_norm")
TOL = 1e-5
POLL_S = 0.005
RUN_TIMEOUT_S = 900.0  # a bound for a loaded 2-core machine, not a speed target


def _argv(run_dir: Path, data_file: Path) -> list[str]:
    return ["--preset", "tiny", "--output-dir", str(run_dir), "--steps", str(STEPS),
            "--save-every", "1", "--eval-problems", "0", "--no-tensorboard",
            "--data.dataset", str(data_file), "--optimizer.learning-rate", "1e-2"]


def _env(cache_dir: Path) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _write_problems(path: Path, count: int = 16, first: int = 3) -> None:
    """`count` short addition problems (GSM8K rows), the first adding `first`."""
    with path.open("w") as f:
        for i in range(count):
            a, b = first + i, 2 * i + 1
            f.write(json.dumps({"question": f"What is {a} plus {b}?",
                                "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}) + "\n")


class Run:
    """One CLI invocation; output goes to a log file (a pipe could fill and block it)."""

    def __init__(self, argv: list[str], env: dict, log: Path, tag: str):
        self.log, self.tag = log, tag
        self._log_f = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "grpo_jax.train", *argv],
                                     cwd=ROOT, env=env, stdout=self._log_f,
                                     stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def tail(self, n: int = 25) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return f"--- last lines of {self.tag} ({self.log}) ---\n" + "\n".join(lines[-n:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()  # SIGKILL
        self.proc.wait()
        self._log_f.close()

    def wait(self) -> int:
        try:
            rc = self.proc.wait(timeout=max(1.0, RUN_TIMEOUT_S - (time.monotonic() - self.started)))
        finally:
            self.kill()
        return rc


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def _complete_steps(names) -> list[int]:
    return sorted(int(n) for n in names if n.isdigit())


def _metric_steps(run_dir: Path) -> list[int]:
    """Steps of metrics.jsonl (a last line cut short by a kill is skipped)."""
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path)] if path.exists() else []


def _strict_rows(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n"), f"{path} does not end with a complete line"
    return [json.loads(line) for line in text.splitlines()]


def _abstract_state(cfg):
    lora = lora_lib.init_lora(model_preset(cfg.model), cfg.lora, train.run_keys(cfg.seed)[0])
    opt_state = make_optimizer(cfg.optimizer, cfg.total_updates).init(lora)
    return {"lora": lora, "opt_state": opt_state}


def _restore(run_dir: Path, cfg):
    ckpt = Checkpointer(run_dir, fingerprint=runs.run_fingerprint(cfg), keep=cfg.keep_checkpoints)
    try:
        return ckpt.restore_latest(_abstract_state(cfg))
    finally:
        ckpt.close()


def _assert_trees_close(a, b, what: str) -> None:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb), what
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=TOL, atol=TOL, err_msg=what)


@pytest.fixture
def started():
    """Every Run the test starts; whatever is still alive when it ends is killed."""
    runs: list[Run] = []
    yield runs
    for run in runs:
        run.kill()


def test_sigkill_anywhere_then_resume_equals_uninterrupted(tmp_path, started):
    seed = int(os.environ.get("GRPO_KILL_RESUME_SEED", random.SystemRandom().randrange(2**31)))
    print(f"kill/resume seed: {seed} (reproduce with GRPO_KILL_RESUME_SEED={seed})")
    rng = random.Random(seed)
    ctx = f"[seed {seed}]"

    data_file = tmp_path / "problems.jsonl"
    _write_problems(data_file)
    env = _env(tmp_path / "jax-cache")
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    ref_argv, run_argv = _argv(ref_dir, data_file), _argv(run_dir, data_file)
    cfg = presets.parse_run_config(run_argv)  # what the CLI makes of these flags
    batch = cfg.grpo.num_prompts
    timings: dict[str, float] = {}

    # -- the uninterrupted reference; also measures the time a step takes ------------
    t0 = time.monotonic()
    ref = Run(ref_argv, env, tmp_path / "reference.log", "reference run")
    started.append(ref)
    row_times: dict[int, float] = {}
    while ref.alive() and time.monotonic() - t0 < RUN_TIMEOUT_S:
        steps = _metric_steps(ref_dir)
        if steps and steps[-1] not in row_times:
            row_times[steps[-1]] = time.monotonic()
        time.sleep(0.02)
    rc = ref.wait()
    timings["reference"] = time.monotonic() - t0
    assert rc == 0, f"{ctx} reference run failed (rc {rc})\n{ref.tail()}"
    times = [row_times[s] for s in sorted(row_times)]
    step_period = statistics.median(np.diff(times).tolist()) if len(times) > 2 else 1.0
    ref_rows = _strict_rows(ref_dir / "metrics.jsonl")
    assert [r["step"] for r in ref_rows] == list(range(1, STEPS + 1)), ctx

    # -- the killed run ---------------------------------------------------------------
    ckpt_dir = run_dir / "checkpoints"
    kills: list[dict] = []
    latest_seen = 0
    t_killed = time.monotonic()

    def check_after_kill(kind: str, run: Run) -> None:
        """The latest complete checkpoint restores (on a copy: opening a Checkpointer
        would clean up the temporary directory the restart has to cope with)."""
        nonlocal latest_seen
        names = _listdir(ckpt_dir)
        complete = _complete_steps(names)
        probe = tmp_path / f"probe-{len(kills)}"
        shutil.copytree(run_dir, probe)
        restored = _restore(probe, cfg)
        where = f"{ctx} after the {kind} kill (checkpoints/: {names})\n{run.tail()}"
        if not complete:
            assert restored is None, where
        else:
            assert restored is not None and restored.step == complete[-1], where
            assert restored.meta["data_position"] == restored.step * batch, where
            # the uninterrupted run keeps only its last checkpoints; compare where it can
            if (ref_dir / "checkpoints" / str(restored.step)).is_dir():
                ref_state = _restore_step(ref_dir, cfg, restored.step)
                _assert_trees_close(restored.state, ref_state, f"{where}: state at step "
                                    f"{restored.step} differs from the uninterrupted run's")
        step = restored.step if restored is not None else 0
        assert step >= latest_seen, f"{where}: progress lost ({latest_seen} -> {step})"
        latest_seen = step
        # rows already logged: 1..k once each (a restart truncated what it redid)
        logged = _metric_steps(run_dir)
        assert logged == list(range(1, len(logged) + 1)), f"{where}: metrics steps {logged}"
        assert len(logged) >= step, where
        kills.append({"kind": kind, "resume_step": step, "entries": names,
                      "after_s": round(time.monotonic() - run.started, 2)})
        shutil.rmtree(probe)

    # 1. SIGKILL inside a checkpoint write: poll for orbax's temporary directory of
    #    the target step and kill the moment it appears. A rare lost race (the write
    #    finished between seeing the directory and the signal) is retried.
    caught_mid_write = False
    for attempt in range(2):
        target = latest_seen + 1 + (rng.randrange(2) if attempt == 0 else 0)
        assert target <= STEPS - 2, f"{ctx} no room left for the write kill"
        run = Run(run_argv, env, tmp_path / f"killed-{len(kills)}.log", f"start {len(kills) + 1}")
        started.append(run)
        tmp_seen = None
        while tmp_seen is None:
            tmp_seen = next((n for n in _listdir(ckpt_dir)
                             if "tmp" in n and n.split(".")[0] == str(target)), None)
            if tmp_seen is not None:
                run.kill()
                break
            assert run.alive(), f"{ctx} run exited before writing step {target}\n{run.tail()}"
            assert time.monotonic() - run.started < RUN_TIMEOUT_S, f"{ctx} timeout\n{run.tail()}"
            time.sleep(POLL_S)
        names = _listdir(ckpt_dir)
        caught_mid_write = tmp_seen in names and str(target) not in names
        check_after_kill("mid-write" if caught_mid_write else "late (write had finished)", run)
        if caught_mid_write:
            assert latest_seen == target - 1, (ctx, kills)
            break
    assert caught_mid_write, f"{ctx} no SIGKILL landed inside a checkpoint write: {kills}"

    # 2. SIGKILL at a uniformly random moment once the restarted run is training: after
    #    it has saved a step past its resume point, within the time its remaining
    #    steps take (scaled down, so a faster run is still alive when the signal comes).
    resume = latest_seen
    run = Run(run_argv, env, tmp_path / f"killed-{len(kills)}.log", f"start {len(kills) + 1}")
    started.append(run)
    # (metrics.jsonl may still hold rows of the killed start until the restart
    # truncates it: a new complete checkpoint is what proves this start is training)
    while _complete_steps(_listdir(ckpt_dir))[-1:] < [resume + 1]:
        assert run.alive(), f"{ctx} restart after the write kill failed\n{run.tail()}"
        assert time.monotonic() - run.started < RUN_TIMEOUT_S, f"{ctx} timeout\n{run.tail()}"
        time.sleep(0.02)
    remaining = STEPS - (resume + 1)
    delay = rng.uniform(0.0, max(0.0, remaining - 1) * step_period * 0.6)
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and run.alive():
        time.sleep(POLL_S)
    assert run.alive(), f"{ctx} run finished before the random kill ({delay:.2f} s)\n{run.tail()}"
    run.kill()
    check_after_kill(f"random (+{delay:.2f} s)", run)

    # 3. Restart and let it finish.
    run = Run(run_argv, env, tmp_path / f"killed-{len(kills)}.log", f"start {len(kills) + 1}")
    started.append(run)
    rc = run.wait()
    timings["killed+resumed"] = time.monotonic() - t_killed
    print(f"timings: {timings}; step period {step_period:.2f} s; kills: {kills}")
    assert rc == 0, f"{ctx} final restart failed (rc {rc}); kills: {kills}\n{run.tail()}"

    # -- the comparison ---------------------------------------------------------------
    where = f"{ctx} kills: {kills}"
    names = _listdir(ckpt_dir)
    assert not [n for n in names if "tmp" in n], f"{where}: temporary dirs left: {names}"
    assert _complete_steps(names)[-1] == STEPS, f"{where}: {names}"

    rows = _strict_rows(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), \
        f"{where}: metrics steps {[r['step'] for r in rows]}"
    for ra, rb in zip(ref_rows, rows):
        for key in KEYS:
            assert ra.get(key) is not None and rb.get(key) is not None, (where, ra["step"], key)
            assert abs(ra[key] - rb[key]) <= TOL, \
                f"{where}: step {ra['step']} {key}: uninterrupted {ra[key]!r}, resumed {rb[key]!r}"

    ref_samples = _strict_rows(ref_dir / "samples.jsonl")
    samples = _strict_rows(run_dir / "samples.jsonl")
    assert [s["step"] for s in samples] == [s["step"] for s in ref_samples], where
    assert [s["completion"] for s in samples] == [s["completion"] for s in ref_samples], where

    a, b = _restore(ref_dir, cfg), _restore(run_dir, cfg)
    assert a.step == b.step == STEPS, where
    assert a.meta["data_position"] == b.meta["data_position"] == STEPS * batch, where
    _assert_trees_close(a.state, b.state, f"{where}: final LoRA / optimizer state differ")
    # the adapters moved far beyond the tolerance, so the comparison above means something
    moved = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(
        jax.tree.leaves(a.state["lora"]), jax.tree.leaves(_abstract_state(cfg)["lora"])))
    assert moved > 100 * TOL, f"{where}: LoRA barely trained (max change {moved})"


def _restore_step(run_dir: Path, cfg, step: int):
    """The state of one given step of a finished run (a copy holding only that step)."""
    probe = run_dir.parent / f"{run_dir.name}-step-{step}"
    (probe / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_dir / "checkpoints" / str(step), probe / "checkpoints" / str(step))
    try:
        restored = _restore(probe, cfg)
        assert restored is not None and restored.step == step
        return restored.state
    finally:
        shutil.rmtree(probe)


def test_sigkill_during_the_final_evaluation_then_restart_evaluates_again(tmp_path, started):
    """Killed while evaluating after its last step, a run restarted in the same
    directory trains nothing more, evaluates, and writes the eval.json an
    uninterrupted run writes."""
    data_file, eval_file = tmp_path / "problems.jsonl", tmp_path / "held_out.jsonl"
    _write_problems(data_file)
    _write_problems(eval_file, count=3, first=40)  # held out: other questions
    env = _env(tmp_path / "jax-cache")
    steps = 2

    def argv(run_dir: Path) -> list[str]:
        return ["--preset", "tiny", "--output-dir", str(run_dir), "--steps", str(steps),
                "--save-every", "1", "--eval-problems", "3", "--no-tensorboard",
                "--data.dataset", str(data_file), "--data.eval-dataset", str(eval_file)]

    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    ref = Run(argv(ref_dir), env, tmp_path / "reference.log", "reference run")
    started.append(ref)
    assert ref.wait() == 0, ref.tail()

    # The final checkpoint is written just before the evaluation starts: kill the
    # moment it is complete.
    run = Run(argv(run_dir), env, tmp_path / "killed.log", "killed run")
    started.append(run)
    while str(steps) not in _listdir(run_dir / "checkpoints"):
        assert run.alive(), f"run exited before its last checkpoint\n{run.tail()}"
        assert time.monotonic() - run.started < RUN_TIMEOUT_S, run.tail()
        time.sleep(POLL_S)
    run.kill()
    # The base model is evaluated before the first step; the trained column is the last.
    early = run_dir / "eval.json"
    assert "trained" not in (json.loads(early.read_text()) if early.exists() else {}), \
        "the kill came after the evaluation"
    assert _metric_steps(run_dir) == list(range(1, steps + 1))
    mtimes = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")}

    restart = Run(argv(run_dir), env, tmp_path / "restart.log", "restart")
    started.append(restart)
    assert restart.wait() == 0, restart.tail()
    assert json.loads((run_dir / "eval.json").read_text()) == \
        json.loads((ref_dir / "eval.json").read_text())
    assert json.loads((run_dir / "eval.json").read_text())["step"] == steps
    # Nothing was trained or saved again.
    assert _metric_steps(run_dir) == list(range(1, steps + 1))
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")} == mtimes
