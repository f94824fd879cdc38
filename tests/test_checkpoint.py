"""Checkpoints: LoRA + optimizer state round trip, keep-last-K, a different run's
directory refused, a SIGKILL during a write never leaves a broken latest, items
restore alone, and the layout before items were separate still restores."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from grpo_jax.checkpoint import Checkpointer, CheckpointMismatch
from grpo_jax.model.config import LoraConfig, TINY
from grpo_jax.model import lora as lora_lib

FINGERPRINT = {"model": "tiny", "lora": [4, 8.0, ["q", "kv"]]}


def _state(seed: int):
    lw = lora_lib.init_lora(TINY, LoraConfig(rank=4, alpha=8.0, targets=("q", "kv")),
                            jax.random.key(seed))
    lw = jax.tree.map(lambda x: x + seed, lw)
    opt = optax.adamw(1e-3).init(lw)
    return {"lora": lw, "opt_state": opt, "rng": {"key": jax.random.key_data(jax.random.key(seed))}}


def test_round_trip_and_keep_last(tmp_path):
    ckpt = Checkpointer(tmp_path, fingerprint=FINGERPRINT, keep=2)
    assert ckpt.restore_latest(_state(0)) is None
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), {"data_position": 8 * step})
    assert ckpt.latest_step() == 3
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 3]
    restored = Checkpointer(tmp_path, fingerprint=FINGERPRINT).restore_latest(_state(0))
    assert restored.step == 3 and restored.meta["data_position"] == 24
    assert isinstance(restored.state["lora"], lora_lib.LoraWeights)
    assert restored.state["lora"].scale == 2.0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restored.state, _state(3))


def test_a_different_run_is_refused(tmp_path):
    Checkpointer(tmp_path, fingerprint=FINGERPRINT).save(1, _state(1), {})
    other = Checkpointer(tmp_path, fingerprint={**FINGERPRINT, "model": "gemma3-270m"})
    with pytest.raises(CheckpointMismatch, match="different run .*differs in: model"):
        other.restore_latest(_state(0))
    # Nothing was overwritten.
    assert Checkpointer(tmp_path, fingerprint=FINGERPRINT).latest_step() == 1


def test_unfinished_write_is_ignored(tmp_path):
    ckpt = Checkpointer(tmp_path, fingerprint=FINGERPRINT)
    ckpt.save(5, _state(5), {})
    # What a write killed before its final rename leaves behind.
    (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1234").mkdir()
    restored = Checkpointer(tmp_path, fingerprint=FINGERPRINT).restore_latest(_state(0))
    assert restored.step == 5


_WRITER = textwrap.dedent("""
    import sys, jax.numpy as jnp
    from grpo_jax.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1], fingerprint={"run": "kill-test"}, keep=2)
    step = (ckpt.latest_step() or 0) + 1
    while True:
        # ~32 MB per checkpoint so a kill often lands mid-write.
        state = {"w": jnp.full((8, 1024, 1024), float(step)), "b": jnp.full((7,), float(step))}
        ckpt.save(step, {"weights": state}, {"data_position": step})
        print(step, flush=True)
        step += 1
""")


def test_sigkill_during_writes_leaves_a_complete_latest(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    root = str(__import__("pathlib").Path(__file__).resolve().parent.parent)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    seen, mid_write = 0, False
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")],
                                stdout=subprocess.PIPE, text=True, env=env)
        first = proc.stdout.readline()  # at least one save finished in this process
        assert first.strip(), "writer produced no checkpoint"
        time.sleep(random.uniform(0.0, 1.0))
        # Then the moment a write is under way (orbax's temporary directory exists):
        # between writes the writer computes the checksums, where a kill proves less.
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not any(
                "tmp" in p.name for p in (tmp_path / "run" / "checkpoints").iterdir()):
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        mid_write |= any("tmp" in p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
        ckpt = Checkpointer(tmp_path / "run", fingerprint={"run": "kill-test"})
        abstract = {"w": jnp.zeros((8, 1024, 1024)), "b": jnp.zeros((7,))}
        restored = ckpt.restore_latest({"weights": abstract})
        assert restored is not None and restored.step >= max(seen, 1)
        assert restored.meta["data_position"] == restored.step
        w = restored.state["weights"]["w"]
        assert float(w.min()) == float(w.max()) == restored.step
        seen = restored.step
    # Writes take most of the writer's time: at least one kill must have hit one,
    # or this test did not test what it claims.
    assert mid_write


OLD_RUN = Path(__file__).parent / "data" / "old_layout_run"


def _expected_old_state():
    with np.load(Path(__file__).parent / "data" / "old_layout_state_step1.npz") as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def test_checkpoints_of_the_old_layout_still_restore(tmp_path):
    """tests/data/old_layout_run was written by the code before LoRA and optimizer
    state were separate items (one `state` item; 2-step tiny run, checkpoint 2
    removed). Its LoRA reads alone, without building an optimizer; the full state
    equals what that code restored (the .npz beside it, saved by that code); and
    training resumes from it, saving the new layout."""
    from grpo_jax import runs, train
    from grpo_jax.update import make_optimizer

    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    cfg = dataclasses.replace(runs.run_config(run), output_dir=str(run))
    assert (run / "checkpoints" / "1" / "state").is_dir()
    expected = _expected_old_state()

    lora, step = runs.restore_lora(run, cfg, TINY)
    assert step == 1 and isinstance(lora, lora_lib.LoraWeights)
    got = jax.tree.leaves(lora)
    assert len(got) < len(expected)  # the LoRA alone: no optimizer state read
    for a, b in zip(got, expected):  # "lora" sorts before "opt_state"
        np.testing.assert_array_equal(np.asarray(a), b)

    abstract_lora = lora_lib.init_lora(TINY, cfg.lora, jax.random.key(0))
    abstract = {"lora": abstract_lora,
                "opt_state": make_optimizer(cfg.optimizer, cfg.total_updates).init(abstract_lora)}
    restored = Checkpointer(run, fingerprint=runs.run_fingerprint(cfg)).restore(1, abstract)
    assert restored.meta["data_position"] == 2
    leaves = jax.tree.leaves(restored.state)
    assert len(leaves) == len(expected)
    for a, b in zip(leaves, expected):
        np.testing.assert_array_equal(np.asarray(a), b)

    train.train(dataclasses.replace(cfg, tensorboard=False))
    assert sorted(p.name for p in (run / "checkpoints" / "2").iterdir()
                  if p.is_dir()) == ["lora", "meta", "opt_state"]
    assert [json.loads(line)["step"] for line in
            (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_items_restore_alone(tmp_path):
    ckpt = Checkpointer(tmp_path, fingerprint=FINGERPRINT)
    ckpt.save(1, _state(1), {})
    restored = Checkpointer(tmp_path, fingerprint=FINGERPRINT).restore(
        1, {"lora": _state(0)["lora"]})
    assert set(restored.state) == {"lora"}
    jax.tree.map(np.testing.assert_array_equal, restored.state["lora"], _state(1)["lora"])
    with pytest.raises(ValueError, match="reserved"):
        ckpt.save(2, {"meta": _state(2)["lora"]}, {})
