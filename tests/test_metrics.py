"""Run logging: JSON rows, strict JSON for NaN, resume truncation, samples, TensorBoard,
progress bar, and the plot script."""
from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from grpo_jax.metrics import MetricsLogger, Progress, read_metrics

REPO = Path(__file__).resolve().parents[1]
PLOT_SCRIPT = REPO / "scripts" / "plot_metrics.py"


def _lines(path: Path) -> list[dict]:
    # json.loads rejects nothing by default (it accepts NaN); parse_constant makes it strict
    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def _write_run(run: Path, steps, *, tensorboard=False, resume_step=0):
    with MetricsLogger(run, tensorboard=tensorboard, resume_step=resume_step) as logger:
        for s in steps:
            logger.log(s, {"reward/mean": s / 10, "kl": 0.01 * s, "format_rate": 0.5})
            logger.log_samples(s, [{"completion": f"c{s}", "reward": 1.0}])


def test_log_writes_one_plain_row_per_step(tmp_path):
    import jax.numpy as jnp

    with MetricsLogger(tmp_path, tensorboard=False, resume_step=0) as logger:
        row = logger.log(1, {"reward/mean": np.float32(0.25), "skipped": np.int64(0),
                             "kl": jnp.asarray(0.5), "ok": True, "n": jnp.asarray([3])})
        logger.log(2, {"reward/mean": 1.5})
        # flushed per row: readable before close
        assert len(read_metrics(tmp_path)) == 2
    assert row == {"step": 1, "reward/mean": 0.25, "skipped": 0, "kl": 0.5, "ok": 1, "n": 3}
    rows = _lines(tmp_path / "metrics.jsonl")
    assert rows == [row, {"step": 2, "reward/mean": 1.5}]
    assert type(rows[0]["skipped"]) is int and type(rows[0]["reward/mean"]) is float


def test_non_finite_values_are_null_and_file_is_strict_json(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=0) as logger:
        logger.log(1, {"loss": float("nan"), "grad_norm": np.float32("inf"), "kl": -np.inf,
                       "reward/mean": 0.0})
        logger.log_samples(1, [{"reward": float("nan"), "logprobs": np.array([0.5, np.nan])}])
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()
    assert _lines(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": None, "grad_norm": None, "kl": None, "reward/mean": 0.0}]
    assert _lines(tmp_path / "samples.jsonl") == [
        {"step": 1, "reward": None, "logprobs": [0.5, None]}]


@pytest.mark.parametrize("bad", [{"x": "text"}, {"x": np.zeros(2)}, {"step": 3}])
def test_log_rejects_non_scalar_values_and_step_key(tmp_path, bad):
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=0) as logger:
        with pytest.raises(ValueError):
            logger.log(1, bad)


@pytest.mark.parametrize("step", [0, -1, 1.0, True])
def test_steps_start_at_one(tmp_path, step):
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=0) as logger:
        with pytest.raises(ValueError, match="step"):
            logger.log(step, {"a": 1.0})


def test_samples_rows_get_the_step(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=0) as logger:
        logger.log_samples(3, [{"completion": "<answer>4</answer>", "reward": np.float64(2.0)},
                               {"completion": "é", "reward": 0}])
        logger.log_samples(4, [])
        with pytest.raises(ValueError, match="step"):
            logger.log_samples(5, [{"step": 5}])
    assert _lines(tmp_path / "samples.jsonl") == [
        {"step": 3, "completion": "<answer>4</answer>", "reward": 2.0},
        {"step": 3, "completion": "é", "reward": 0}]


def test_resume_drops_rows_after_the_checkpoint_step(tmp_path):
    _write_run(tmp_path, range(1, 6))  # steps 1..5 logged, last checkpoint at 3
    _write_run(tmp_path, [4, 5, 6], resume_step=3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in _lines(tmp_path / "samples.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic rewrite left no temp files


def test_resume_drops_a_truncated_last_line(tmp_path):
    _write_run(tmp_path, [1, 2])
    for name in ("metrics.jsonl", "samples.jsonl"):
        with open(tmp_path / name, "a") as f:
            f.write('{"step": 3, "reward/m')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]  # readers skip it too
    _write_run(tmp_path, [3], resume_step=2)
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert [r["step"] for r in _lines(tmp_path / "samples.jsonl")] == [1, 2, 3]


def test_resume_keeps_a_complete_last_row_missing_its_newline(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}')
    _write_run(tmp_path, [3], resume_step=2)
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_resume_from_zero_starts_over_and_none_refuses_existing_rows(tmp_path):
    _write_run(tmp_path, [1, 2])
    with pytest.raises(ValueError, match="resume_step"):
        MetricsLogger(tmp_path, tensorboard=False)
    before = (tmp_path / "metrics.jsonl").read_text()
    MetricsLogger(tmp_path, tensorboard=False, resume_step=2).close()  # nothing to drop
    assert (tmp_path / "metrics.jsonl").read_text() == before
    MetricsLogger(tmp_path, tensorboard=False, resume_step=0).close()
    assert read_metrics(tmp_path) == [] and _lines(tmp_path / "samples.jsonl") == []
    MetricsLogger(tmp_path / "new", tensorboard=False).close()  # a new directory is fine


def test_corrupt_line_before_the_end_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=":2:"):
        MetricsLogger(tmp_path, tensorboard=False, resume_step=1)
    with pytest.raises(ValueError, match="resume_step"):
        MetricsLogger(tmp_path, tensorboard=False, resume_step=-1)


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    pytest.importorskip("tensorboardX")
    _write_run(tmp_path, [1, 2], tensorboard=True)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    # the tag names are in the (protobuf) records
    assert b"reward/mean" in events[0].read_bytes()


def test_progress_bar(tmp_path):
    with Progress(total=3, enabled=False) as p:
        p.update({"reward/mean": 1.0})
    buf = io.StringIO()
    with Progress(total=3, initial=1, enabled=True, file=buf) as p:
        p.update({"reward/mean": 1.25, "format_rate": 0.5, "kl": float("nan"),
                  "tokens_per_s": np.float32(1234.0)})
        p.update({})
    out = buf.getvalue()
    assert "3/3" in out and "reward=1.250" in out and "format=50%" in out and "kl=nan" in out
    buf = io.StringIO()  # disabled (processes other than 0): nothing at all
    with Progress(total=3, enabled=False, file=buf) as p:
        p.update({"reward/mean": 1.0})
        p.note("a phase")
    assert buf.getvalue() == ""


def test_progress_off_a_terminal_is_one_plain_line_per_step_and_note():
    buf = io.StringIO()  # not a terminal: auto mode prints lines, no carriage returns
    with Progress(total=4, initial=1, file=buf) as p:
        p.note("GRPO: steps 2-4")
        p.update({"sft/loss": 2.5}, phase="sft")
        p.update({"reward/mean": -1.5, "format_rate": 0.25, "kl": 1e-4}, phase="grpo")
        p.update({"reward/mean": float("nan")}, phase="grpo")
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue() and len(lines) == 4, lines
    assert lines[0] == "GRPO: steps 2-4"
    assert lines[1].startswith("sft step 2/4 | sft loss 2.500 | ") and "ETA " in lines[1]
    assert lines[2].startswith("grpo step 3/4 | reward -1.500 | format 25% | kl 0.0001 | ")
    assert lines[3].startswith("grpo step 4/4 | reward nan | ") and "ETA" not in lines[3]


def test_format_duration():
    from grpo_jax.metrics import format_duration
    assert [format_duration(s) for s in (0.4, 59, 61, 3599, 3600, 7385)] == [
        "0 s", "59 s", "1m 01s", "59m 59s", "1h 00m", "2h 03m"]


def _load_plot_module():
    spec = importlib.util.spec_from_file_location("plot_metrics", PLOT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through it
    spec.loader.exec_module(module)
    return module


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"step": 1, "reward/mean": 0.1, "format_rate": 0.0, "kl": None},
            {"step": 2, "reward/mean": 0.4, "format_rate": 0.5, "kl": 0.01},
            {"step": 3, "reward/mean": 0.9, "format_rate": 1.0}]
    out = _load_plot_module().plot(rows, tmp_path / "sub" / "m.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_plot_script_missing_file_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(PLOT_SCRIPT), str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "metrics.jsonl" in proc.stderr


def test_missing_tensorboardx_is_a_clear_error_only_when_asked_for(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="tensorboardX"):
        MetricsLogger(tmp_path, tensorboard=True, resume_step=0)
    MetricsLogger(tmp_path, tensorboard=False, resume_step=0).close()
