"""Two processes x 4 CPU devices under `jax.distributed` on localhost train the same
steps as one process on one device, evaluate on the mesh to the same answers, and
save and restore sharded checkpoints."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.xdist_group("multihost")

# 8 held-out problems through 4 decode slots: the refill stream inserts on the mesh.
COMMON = ["--preset", "tiny", "--steps", "2", "--save-every", "1", "--grpo.num-prompts", "4",
          "--eval-problems", "8", "--eval-batch-size", "4", "--no-tensorboard"]
# The tiny model's digit reward (a learning signal: non-zero advantages and gradients).
TRAIN = Path(__file__).with_name("digit_reward_train.py")
COMPARED = ("loss", "reward/mean", "kl", "grad_norm", "completion_len/mean", "logprob_drift")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    """The session's compilation cache (tests/conftest.py) is inherited: the restoring
    run reads back what the first two-process run compiled."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)}


def _run_two_processes(out: Path, timeout: float = 600) -> None:
    """Both processes of one run; both are killed if either fails or time runs out."""
    port = _free_port()
    argv = [sys.executable, str(TRAIN), *COMMON, "--output-dir", str(out),
            "--mesh.data", "2", "--mesh.fsdp", "2", "--mesh.tensor", "2",
            "--distributed.coordinator", f"localhost:{port}", "--distributed.num-processes", "2"]
    procs, logs = [], []
    try:
        for pid in range(2):
            log = open(out.parent / f"{out.name}-process{pid}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen([*argv, "--distributed.process-id", str(pid)],
                                          env=_env(4), stdout=log, stderr=subprocess.STDOUT))
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for pid, (proc, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        text = log.read()
        log.close()
        assert proc.returncode == 0, f"process {pid} exited {proc.returncode}:\n{text[-3000:]}"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _adapters(run: Path, step: int) -> list[np.ndarray]:
    from grpo_jax import runs
    from grpo_jax.model.config import TINY

    cfg = runs.run_config(run)
    lora, _ = runs.restore_lora(run, cfg, TINY, step)
    return [np.asarray(x) for x in __import__("jax").tree.leaves(lora)]


def test_two_hosts_train_save_and_restore_like_one_device(tmp_path):
    single = tmp_path / "single"
    proc = subprocess.run([sys.executable, str(TRAIN), *COMMON, "--output-dir",
                           str(single)], env=_env(1), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    multi = tmp_path / "multi"
    _run_two_processes(multi)
    # Only process 0 writes the logs: one row per step, not two.
    assert [row["step"] for row in _metrics(multi)] == [1, 2]
    for a, b in zip(_metrics(single), _metrics(multi)):
        assert a["grad_norm"] > 1e-3 and a["reward/mean"] > 0, a  # something to learn
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    # The end-of-run evaluation ran on the mesh in both processes (process 0 wrote it):
    # the same greedy answers as one device, base and trained columns.
    one, two = (json.loads((run / "eval.json").read_text()) for run in (single, multi))
    for column in ("base", "trained"):
        assert one[column] == two[column], column
        answers = [[r["index"], r["completion"]] for r in one["records"][column]]
        assert answers == [[r["index"], r["completion"]] for r in two["records"][column]]
        assert len(answers) == 8

    # Restore: drop checkpoint 2, rerun; the processes restore step 1's sharded state and
    # redo step 2, which must give step 2's adapters again.
    before = _adapters(multi, 2)
    shutil.rmtree(multi / "checkpoints" / "2")
    _run_two_processes(multi)
    after = _adapters(multi, 2)
    want = _adapters(single, 2)
    for x, y, z in zip(before, after, want):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
        # Adam divides by sqrt(v): where a gradient is ~0 its rounding moves the update
        # by up to ~lr; lr is 1e-2, so 2e-4 still catches any real difference.
        np.testing.assert_allclose(y, z, rtol=1e-4, atol=2e-4)
