"""The SFT warm-up as a phase of the training run: resume across the SFT -> GRPO
boundary, the SFT policy as GRPO's reference, eval.json's three columns, and rows
without a worked solution."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
import pytest

from grpo_jax import data, presets, rollout, runs, sft, train
from grpo_jax.model.config import TINY
from grpo_jax.metrics import read_metrics
from grpo_jax.model import gemma3, lora as lora_lib

SFT_STEPS, GRPO_STEPS = 2, 2


def _problems(path: Path, count: int = 12) -> Path:
    with path.open("w") as f:
        for i in range(count):
            a, b = 3 + i, 2 * i + 1
            f.write(json.dumps({"question": f"What is {a} plus {b}?",
                                "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}) + "\n")
    return path


def _argv(run: Path, problems: Path, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--output-dir", str(run), "--steps", str(GRPO_STEPS),
            "--sft.steps", str(SFT_STEPS), "--sft.batch-size", "2",
            "--sft.learning-rate", "1e-2", "--save-every", "1", "--no-tensorboard",
            "--eval-problems", "2", "--data.dataset", str(problems),
            "--data.eval-dataset", str(problems), "--data.prompt-style", "plain",
            "--data.prefill", "<reasoning>", "--sampler.stop-strings", "</answer>", *extra]


class Interrupted(Exception):
    pass


def _stop_after(monkeypatch, last_step: int) -> None:
    """Make the loop raise once `last_step` is done (and checkpointed)."""
    for module, name in ((sft, "sft_step"), (rollout, "grpo_step")):
        real = getattr(module, name)

        def wrapped(ctx, params, state, step, *position, _real=real):
            if step > last_step:
                raise Interrupted(step)
            return _real(ctx, params, state, step, *position)

        monkeypatch.setattr(module, name, wrapped)


def _final(run: Path):
    cfg = runs.run_config(run)
    return runs.restore_adapters(run, cfg, TINY), read_metrics(run / "metrics.jsonl"), \
        json.loads((run / "eval.json").read_text())


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft_phase")
    problems = _problems(tmp / "problems.jsonl")
    run = tmp / "uninterrupted"
    assert train.main(_argv(run, problems)) == 0
    return run, problems


def test_checkpoints_and_eval_columns(reference_run):
    run, _ = reference_run
    adapters, rows, result = _final(run)
    assert adapters.step == SFT_STEPS + GRPO_STEPS
    assert adapters.sft is not None and adapters.grpo is not None
    assert [r["step"] for r in rows] == list(range(1, SFT_STEPS + GRPO_STEPS + 1))
    assert all("sft/loss" in r for r in rows[:SFT_STEPS])
    assert all("reward/mean" in r and "sft/loss" not in r for r in rows[SFT_STEPS:])
    assert result["steps"] == {"base": 0, "sft": SFT_STEPS, "trained": SFT_STEPS + GRPO_STEPS}
    for column in ("base", "sft", "trained"):
        lo, hi = result[column]["exact_ci95"]
        assert 0 <= lo <= result[column]["exact_accuracy"] <= hi <= 1
    # The SFT -> GRPO boundary checkpoint holds the SFT adapters as its LoRA.
    boundary = runs.restore_adapters(run, runs.run_config(run), TINY, SFT_STEPS)
    assert boundary.grpo is None
    jax.tree.map(np.testing.assert_array_equal, boundary.sft, adapters.sft)


def test_grpo_reference_is_the_sft_policy(reference_run):
    run, _ = reference_run
    rows = read_metrics(run / "metrics.jsonl")
    # The SFT adapters moved the model (its loss fell) ...
    assert rows[SFT_STEPS - 1]["sft/loss"] < rows[0]["sft/loss"]
    # ... yet GRPO's first step sees no KL: its reference (LoRA off) is the merged SFT
    # model, and its fresh LoRA starts at zero. Against the raw base this would be > 0.
    assert abs(rows[SFT_STEPS]["kl"]) < 1e-6
    # The checkpoint's policy: the SFT adapters merged into the base, GRPO's on top.
    cfg = runs.run_config(run)
    adapters = runs.restore_adapters(run, cfg, TINY)
    base = runs.load_run_base(cfg).params
    merged, lora = adapters.policy(base)
    tokens = jax.numpy.asarray([[2, 40, 41, 42, 43]])
    mask = tokens > 0
    pos = gemma3.left_padded_positions(mask)
    forward = jax.jit(gemma3.forward, static_argnums=4)  # eager, each op compiles alone
    got = forward(merged, tokens, pos, mask, TINY, lora)
    want = forward(lora_lib.merge(lora_lib.merge(base, adapters.sft), lora), tokens, pos,
                   mask, TINY)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


@pytest.mark.parametrize("last_step", [1, SFT_STEPS, SFT_STEPS + 1])
def test_resume_across_the_boundary_equals_an_uninterrupted_run(
        reference_run, tmp_path, monkeypatch, last_step):
    ref_run, problems = reference_run
    run = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        _stop_after(m, last_step)
        with pytest.raises(Interrupted):
            train.train(presets.parse_run_config(_argv(run, problems)))
    assert runs.restore_adapters(run, runs.run_config(run), TINY).step == last_step
    assert train.main(_argv(run, problems)) == 0
    (want, want_rows, want_eval), (got, got_rows, got_eval) = _final(ref_run), _final(run)
    assert got.step == want.step
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 (got.sft, got.grpo), (want.sft, want.grpo))
    assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows]
    for a, b in zip(got_rows, want_rows):
        for key in ("sft/loss", "reward/mean", "loss", "kl", "completion_len/mean"):
            if key in b:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6,
                                           err_msg=f"step {b['step']} {key}")
    for column in ("base", "sft", "trained"):
        assert got_eval[column] == want_eval[column], column


def test_rows_without_a_worked_solution_are_malformed_for_sft(tmp_path, caplog, monkeypatch):
    # A CLI run earlier in this process stops grpo_jax's records at its own handler.
    monkeypatch.setattr(logging.getLogger("grpo_jax"), "propagate", True)
    rows = [{"question": "What is 1 plus 1?", "answer": "1 + 1 = 2\n#### 2"},
            {"question": "What is 2 plus 2?", "answer": "#### 4"},
            {"question": "What is 3 plus 3?", "answer": 6}]
    assert len(data.problems_from_rows(rows, "rows")) == 3  # GRPO needs no solution
    with caplog.at_level("WARNING"):
        kept = data.problems_from_rows(rows, "rows", need_solution=True)
    assert [p.index for p in kept] == [0]
    assert "row 1" in caplog.text and "no worked solution" in caplog.text
    with pytest.raises(data.DataError, match="row 1: no worked solution"):
        data.problems_from_rows(rows, "rows", "error", need_solution=True)
    # A training file with no solutions at all: SFT refuses it in one line.
    path = tmp_path / "bare.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[1:]) + "\n")
    assert train.main(_argv(tmp_path / "run", path)) != 0


def test_packed_sft_run_matches_the_unpacked_run(tmp_path):
    """sft.pack_length through the trainer: the same problems and first loss as one
    problem a row (the same update, to float rounding), with fuller batches."""
    problems = _problems(tmp_path / "problems.jsonl")
    found = {}
    # A step's two problems (96 prompt tokens each, the tiny preset's cut, and at most 88
    # target tokens between them) fit one packed row of 288: one row where the unpacked
    # batch pads each target to 64.
    for name, extra in (("rows", ()), ("packed", ("--sft.pack-length", "288"))):
        run = tmp_path / name
        assert train.main(_argv(run, problems, "--steps", "1", "--eval-problems", "0",
                                *extra)) == 0
        found[name] = [m for m in read_metrics(run / "metrics.jsonl") if "sft/loss" in m]
    rows, packed = found["rows"], found["packed"]
    assert len(rows) == len(packed) == SFT_STEPS
    for a, b in zip(rows, packed):
        assert a["sft/target_tokens"] == b["sft/target_tokens"]
        np.testing.assert_allclose(b["sft/loss"], a["sft/loss"], rtol=1e-4)
        assert b["sft/fill"] > a["sft/fill"]


def test_branch_grpo_starts_from_the_same_sft_model(reference_run, tmp_path):
    """scripts/branch_grpo.py: a GRPO variant from the source run's SFT boundary. Its
    SFT rows and SFT-only column are the source's, its first GRPO step samples what
    the source's did (same SFT model, same key), and a flag that changes SFT is refused."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "branch_grpo.py"
    spec = importlib.util.spec_from_file_location("branch_grpo", path)
    branch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(branch)

    run, other = reference_run[0], tmp_path / "branch"
    with pytest.raises(ValueError, match="these flags change it: sft.steps"):
        branch.branch(run, other, ["--sft.steps", "3"])
    assert not other.exists()
    assert branch.main([str(run), str(other), "--optimizer.learning-rate", "0.05"]) == 0
    assert runs.run_config(other).optimizer.learning_rate == 0.05
    a, b = read_metrics(run / "metrics.jsonl"), read_metrics(other / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert b[:SFT_STEPS] == a[:SFT_STEPS]
    assert b[SFT_STEPS]["reward/mean"] == a[SFT_STEPS]["reward/mean"]
    ea, eb = (json.loads((d / "eval.json").read_text()) for d in (run, other))
    assert eb["sft"] == ea["sft"] and eb["base"] == ea["base"]
    assert eb["steps"]["trained"] == 4 and "comparison" in eb
    with pytest.raises(ValueError, match="exists; a branch starts in a new directory"):
        branch.branch(run, other, [])
