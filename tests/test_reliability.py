"""Faults and bad input: a damaged checkpoint is detected and skipped, a filesystem
failure or a bad input is one line and exit 2 before the work, and nothing is lost.

The CLI checks run the real commands in subprocesses (one line on stderr, exit 2);
the resume checks run `train.train` in process and compare with an uninterrupted
run's metrics and final checkpoint.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors import safe_open

from grpo_jax import presets, rollout, runs, train
from grpo_jax.checkpoint import DAMAGED_DIR
from grpo_jax.presets import TRAIN_PRESETS

ROOT = Path(__file__).resolve().parent.parent
TINY = dataclasses.replace(TRAIN_PRESETS["tiny"], tensorboard=False, eval_problems=0,
                           save_every=1, keep_checkpoints=3, steps=4)
KEYS = ("reward/mean", "loss", "kl", "grad_norm", "completion_len/mean")


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _cli(module: str, args, tmp_path, env_extra=None):
    """(exit code, stderr lines) of `python -m grpo_jax.<module> args`."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path.parent / "jax-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", f"grpo_jax.{module}", *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stderr.strip().splitlines()


def _one_error_line(code, lines, *fragments):
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, (code, lines)
    assert lines[-1] == errors[0], lines  # the error closes the output: no traceback after
    assert not any(line.startswith("Traceback") for line in lines), lines
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


# ---------------------------------------------------------------------------
# Damaged checkpoints


def _largest_array_file(step_dir: Path, item: str) -> Path:
    """The largest data file an item's OCDBT database reads (`<item>/d/…`; the
    per-process copies under ocdbt.process_0/ are merged into it at save)."""
    files = [p for p in step_dir.glob(f"{item}/d/*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def truncate(step_dir: Path, item: str = "*") -> None:
    path = _largest_array_file(step_dir, item)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def flip_bytes(step_dir: Path, item: str = "*") -> None:
    """Invert every 97th byte of the middle half of the largest array file."""
    path = _largest_array_file(step_dir, item)
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 4, 3 * len(data) // 4, 97):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    train.train(dataclasses.replace(TINY, output_dir=str(run)))
    return run


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """The same run stopped after step 3 (checkpoints 1, 2, 3): a template to copy."""
    run = tmp_path_factory.mktemp("three") / "run"
    real = rollout.grpo_step

    def stop_before_step_4(ctx, params, state, step, position):
        if step == 4:
            raise KeyboardInterrupt
        return real(ctx, params, state, step, position)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(rollout, "grpo_step", stop_before_step_4)
        train.train(dataclasses.replace(TINY, output_dir=str(run)))
    return run


def _final_lora(run_dir):
    cfg = runs.run_config(run_dir)
    return runs.restore_lora(run_dir, cfg, runs.load_run_base(cfg).cfg)


@pytest.mark.parametrize("damage", [truncate, flip_bytes])
def test_damaged_newest_checkpoint_is_skipped_and_the_run_ends_as_uninterrupted(
        damage, three_steps, uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(three_steps, run)
    damage(run / "checkpoints" / "3")
    # A handler on the package logger itself: a CLI run in this process (log_to_stderr)
    # stops it propagating to pytest's root handler.
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("grpo_jax")
    logger.addHandler(handler)
    try:
        train.train(dataclasses.replace(TINY, output_dir=str(run)))
    finally:
        logger.removeHandler(handler)
    warnings = [r.getMessage() for r in records]
    assert any(m.startswith("checkpoint 3 is damaged") and "skipped" in m for m in warnings), \
        warnings
    assert all("\n" not in m for m in warnings)
    # Kept as evidence, out of the kept checkpoints; the run redid step 3 from step 2.
    assert (run / DAMAGED_DIR / "3").is_dir()
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [2, 3, 4]
    a, b = _rows(uninterrupted), _rows(run)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in KEYS:
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), (ra["step"], key)
    (lora_a, step_a), (lora_b, step_b) = _final_lora(uninterrupted), _final_lora(run)
    assert step_a == step_b == 4
    jax.tree.map(np.testing.assert_array_equal, lora_a, lora_b)


def test_every_checkpoint_damaged_is_one_line_and_nothing_is_deleted(three_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(three_steps, run)
    for step in (1, 2, 3):
        (truncate if step % 2 else flip_bytes)(run / "checkpoints" / str(step))
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    code, lines = _cli("train", ["--preset", "tiny", "--output-dir", run, "--steps", 4,
                                 "--save-every", 1, "--eval-problems", 0, "--no-tensorboard"],
                       tmp_path)
    _one_error_line(code, lines, "every checkpoint in", "is damaged (none deleted): 3: ",
                    "; 2: ", "; 1: ")
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


def test_evaluate_and_export_use_the_newest_good_checkpoint(three_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(three_steps, run)
    flip_bytes(run / "checkpoints" / "3", "lora")  # what evaluate and export read
    before = sorted(str(p.relative_to(run)) for p in (run / "checkpoints").rglob("*"))

    code, lines = _cli("evaluate", ["--run-dir", run, "--num-problems", 2], tmp_path)
    assert code == 0, lines
    assert any("checkpoint 3 is damaged" in line for line in lines), lines
    # Two problems, not the run's own four: eval_n2.json, the run's eval.json untouched.
    assert json.loads((run / "eval_n2.json").read_text())["step"] == 2
    code, lines = _cli("evaluate", ["--run-dir", run, "--num-problems", 2, "--step", 3],
                       tmp_path)
    _one_error_line(code, lines, "checkpoint 3 is damaged")

    code, lines = _cli("export", ["--run-dir", run, "--out", tmp_path / "export"], tmp_path)
    assert code == 0, lines
    with safe_open(str(tmp_path / "export" / "model.safetensors"), "np") as f:
        assert f.metadata()["grpo_jax_step"] == "2"
    code, lines = _cli("export", ["--run-dir", run, "--out", tmp_path / "export3", "--step", 3],
                       tmp_path)
    _one_error_line(code, lines, "checkpoint 3 is damaged")
    # Readers never move or delete anything.
    assert sorted(str(p.relative_to(run)) for p in (run / "checkpoints").rglob("*")) == before
    assert not (run / DAMAGED_DIR).exists()


# ---------------------------------------------------------------------------
# The filesystem


def test_output_dir_that_is_a_file_or_under_one(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    for out in (afile, afile / "run"):
        code, lines = _cli("train", ["--preset", "tiny", "--output-dir", out], tmp_path)
        _one_error_line(code, lines, f"cannot write to {out}: {afile} is a file")
    assert afile.read_text() == "not a directory"


def test_output_dir_that_refuses_writes(tmp_path):
    """As root chmod does not bite: the write probe is made to fail instead."""
    probe = ("import sys, tempfile, grpo_jax.fileio as f\n"
             "def refuse(*a, **k): raise PermissionError(13, 'Permission denied')\n"
             "f.tempfile.TemporaryFile = refuse\n"
             "from grpo_jax.{module} import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", probe.format(module="train"), "--preset",
                           "tiny", "--output-dir", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    _one_error_line(proc.returncode, proc.stderr.strip().splitlines(),
                    f"cannot write to {out}: Permission denied")
    assert not (out / "checkpoints").exists() and not (out / "config.json").exists()


def test_evaluate_and_export_check_they_can_write_first(three_steps, tmp_path, monkeypatch):
    from grpo_jax import evaluate, export, fileio

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(fileio.tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr(runs, "load_run_base", no_model)
    with pytest.raises(OSError, match="cannot write to .*: Permission denied"):
        evaluate.evaluate_run_dir(evaluate.EvaluateArgs(run_dir=three_steps, num_problems=2))
    with pytest.raises(OSError, match=f"cannot write to {tmp_path}: Permission denied"):
        export.export_merged(three_steps, out_dir=tmp_path / "export")


def test_a_failing_save_is_one_line_and_loses_nothing(uninterrupted, tmp_path):
    """A save that raises OSError (a full disk) at step 3: one line, exit 2, checkpoints
    1 and 2 intact; the restart resumes from 2 and ends as the uninterrupted run."""
    run = tmp_path / "run"
    argv = ["--preset", "tiny", "--output-dir", str(run), "--steps", "4", "--save-every", "1",
            "--eval-problems", "0", "--no-tensorboard"]
    script = ("import errno, sys, orbax.checkpoint as ocp\n"
              "real = ocp.CheckpointManager.save\n"
              "def save(self, step, *a, **k):\n"
              "    if step == 3:\n"
              "        raise OSError(errno.ENOSPC, 'No space left on device', str(self.directory))\n"
              "    return real(self, step, *a, **k)\n"
              "ocp.CheckpointManager.save = save\n"
              "from grpo_jax.train import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    _one_error_line(proc.returncode, proc.stderr.strip().splitlines(),
                    "saving checkpoint 3", "No space left on device",
                    "the earlier checkpoints are intact")
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == \
        ["1", "2"]
    train.train(presets.parse_run_config(argv))
    a, b = _rows(uninterrupted), _rows(run)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in KEYS:
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), (ra["step"], key)
    assert errno.ENOSPC  # (the simulated error above)


def test_an_os_error_that_escapes_names_its_path():
    from grpo_jax.cli import one_line

    e = OSError(errno.EROFS, "Read-only file system", "/some/run/eval.json")
    assert one_line(e) == "Read-only file system: /some/run/eval.json"
    assert one_line(ValueError("two\nlines")) == "two lines"


# ---------------------------------------------------------------------------
# Inputs checked before the work


def test_run_inputs_are_resolved_before_any_model_is_loaded(tmp_path):
    out = tmp_path / "run"
    code, lines = _cli("train", ["--preset", "tiny", "--output-dir", out,
                                 "--rewards.functions", "nope", "1.0"], tmp_path)
    _one_error_line(code, lines, "unknown reward 'nope' in --rewards.functions")
    code, lines = _cli("train", ["--preset", "tiny", "--output-dir", out, "--mesh.data", "2"],
                       tmp_path)
    _one_error_line(code, lines, "--mesh.data 2 x --mesh.fsdp 1 x --mesh.tensor 1 = 2 devices, "
                                 "but this process has 1")
    assert not out.exists()


def test_evaluate_and_generate_inputs(three_steps, tmp_path):
    code, lines = _cli("evaluate", ["--run-dir", three_steps, "--num-problems", 0], tmp_path)
    _one_error_line(code, lines, "--num-problems must be positive")
    # three_steps was trained with --eval-problems 0.
    code, lines = _cli("evaluate", ["--run-dir", three_steps], tmp_path)
    _one_error_line(code, lines, "trained with --eval-problems 0; pass --num-problems N")
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("\n")
    code, lines = _cli("generate", ["--model", "tiny", "--prompts-file", empty], tmp_path)
    _one_error_line(code, lines, f"{empty} holds no prompts")


def test_save_failure_is_wrapped_in_process(tmp_path, monkeypatch):
    """Checkpointer.save turns any failure of the write into one OSError naming the step."""
    from grpo_jax.checkpoint import Checkpointer

    def fail(self, *args, **kwargs):
        raise RuntimeError("tensorstore: write failed\nmore detail")

    ckpt = Checkpointer(tmp_path, fingerprint={"run": "x"})
    ckpt.save(1, {"w": {"a": np.ones(3, np.float32)}}, {})
    monkeypatch.setattr(ocp.CheckpointManager, "save", fail)
    with pytest.raises(OSError, match="saving checkpoint 2 .* failed \\(RuntimeError: "
                                      "tensorstore: write failed\\); the earlier checkpoints "
                                      "are intact"):
        ckpt.save(2, {"w": {"a": np.ones(3, np.float32)}}, {})
    monkeypatch.undo()
    restored = Checkpointer(tmp_path, fingerprint={"run": "x"}).restore_latest(
        {"w": {"a": np.zeros(3, np.float32)}})
    assert restored.step == 1


def test_arrays_that_read_back_different_fail_their_checksum(tmp_path, monkeypatch):
    """Storage that returns other values without an error (OCDBT's own CRCs catch the
    flips tried above; a silent one is simulated): the saved checksums catch it."""
    from grpo_jax.checkpoint import CheckpointDamaged, Checkpointer

    items = {"lora": {"a": np.arange(6, dtype=np.float32)}, "opt": {"m": np.ones(2, np.float32)}}
    Checkpointer(tmp_path, fingerprint={"run": "x"}).save(1, items, {})
    real = ocp.CheckpointManager.restore

    def corrupting_restore(self, step, *args, **kwargs):
        out = real(self, step, *args, **kwargs)
        if "lora" in out:
            a = np.array(out["lora"]["a"])
            a[3] += 1e-3
            out["lora"]["a"] = a
        return out

    monkeypatch.setattr(ocp.CheckpointManager, "restore", corrupting_restore)
    ckpt = Checkpointer(tmp_path, fingerprint={"run": "x"})
    abstract = {k: jax.tree.map(np.zeros_like, v) for k, v in items.items()}
    with pytest.raises(CheckpointDamaged, match="checkpoint 1 is damaged: item lora does not "
                                                "match the checksum saved with it"):
        ckpt.restore(1, abstract)
    assert ckpt.restore(1, {"opt": abstract["opt"]}).step == 1  # the intact item alone reads
