"""Run logging: metrics.jsonl / samples.jsonl, TensorBoard scalars and a progress bar.

Files under the run directory:

    metrics.jsonl      one {"step": k, "<name>": value, ...} row per training step
    samples.jsonl      {"step": k, ...} rows of sampled completions
    tensorboard/       event files with the same scalars (tensorboardX)

Step numbering starts at 1: step k is the k-th optimizer step, and step 0 means
"nothing trained yet". `MetricsLogger(..., resume_step=k)` drops every row with
step > k, so a run killed after its last checkpoint (step k) and resumed from it
does not keep rows of the steps it is about to redo; a fresh run passes
resume_step=0, which empties the files.

Non-finite values are written as JSON null: the files stay strict JSON (no NaN
tokens) that any reader accepts, and a diverged step is still visible.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from grpo_jax.fileio import atomic_write_text

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"


# ---------------------------------------------------------------------------
# Values


def _scalar(name: str, value: Any) -> int | float:
    """A metric value as a plain Python int or float (numpy / JAX scalars, 1-element arrays)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    try:
        arr = np.asarray(value)  # jax.Array and numpy scalars land here
    except Exception:  # noqa: BLE001 - anything unconvertible is a caller bug, reported below
        arr = None
    if arr is None or arr.size != 1 or arr.dtype.kind not in "biuf":
        raise ValueError(f"metric {name!r} must be a real scalar, got {type(value).__name__} "
                         f"{getattr(arr, 'shape', '')}")
    item = arr.reshape(()).item()
    return int(item) if arr.dtype.kind in "biu" else float(item)


def _json_safe(value: Any) -> Any:
    """Sample-row values as strict-JSON types: numpy/JAX scalars unwrapped, inf/NaN -> None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "__array__"):
        return _json_safe(np.asarray(value).tolist())
    if isinstance(value, numbers.Real):
        return _json_safe(float(value))
    return str(value)  # e.g. a Path: keep the row writable rather than fail a training run


def _step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
        raise ValueError(f"step must be an int >= 1 (numbering starts at 1), got {step!r}")
    return int(step)


# ---------------------------------------------------------------------------
# Reading and truncating JSON-lines files


def _parse_rows(path: Path, text: str) -> tuple[list[dict], bool]:
    """Rows of a JSON-lines file's `text` -> (rows, dropped_tail).

    A last line that does not parse is a write cut short by a kill: dropped, and
    reported through dropped_tail. A bad line anywhere else is corruption: ValueError.
    """
    lines = text.split("\n")
    # the final element is "" when the file ends in a newline (the normal case)
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows: list[dict] = []
    dropped_tail = False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                dropped_tail = True
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or isinstance(row.get("step"), bool) \
                or not isinstance(row.get("step"), int):
            if i == last and not text.endswith("\n"):
                dropped_tail = True  # e.g. '{"step": 3' cut to '3' still parses
                break
            raise ValueError(f"{path}:{i + 1}: expected an object with an integer \"step\"")
        rows.append(row)
    return rows, dropped_tail


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics.jsonl (or of RUN_DIR/metrics.jsonl when given a directory).

    A truncated last line (a run killed mid-write, or still writing) is skipped.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    return _parse_rows(path, path.read_text(encoding="utf-8"))[0]


def _atomic_write_rows(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, allow_nan=False, ensure_ascii=False) + "\n"
                                    for row in rows))


def _truncate_after(path: Path, step: int) -> None:
    """Keep rows with step <= `step`; rewrite only if something goes."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    rows, dropped_tail = _parse_rows(path, text)
    kept = [r for r in rows if r["step"] <= step]
    # a complete last row without its newline would be glued to the next append
    if dropped_tail or len(kept) != len(rows) or (text and not text.endswith("\n")):
        _atomic_write_rows(path, kept)


# ---------------------------------------------------------------------------
# Logger


class MetricsLogger:
    """Append-only metrics and sample logs for one run directory.

    resume_step=None means "a new run here": existing non-empty metrics/samples files
    raise ValueError rather than being mixed with or silently overwritten. resume_step=k
    (k >= 0) keeps only rows with step <= k; 0 therefore starts over.
    """

    def __init__(self, output_dir: str | os.PathLike, *, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.output_dir = Path(output_dir)
        self.metrics_path = self.output_dir / METRICS_FILE
        self.samples_path = self.output_dir / SAMPLES_FILE
        if resume_step is not None and (isinstance(resume_step, bool) or
                                        not isinstance(resume_step, numbers.Integral)
                                        or resume_step < 0):
            raise ValueError(f"resume_step must be None or an int >= 0, got {resume_step!r}")
        self.output_dir.mkdir(parents=True, exist_ok=True)

        if resume_step is None:
            existing = [p for p in (self.metrics_path, self.samples_path)
                        if p.exists() and p.stat().st_size > 0]
            if existing:
                raise ValueError(
                    f"{', '.join(str(p) for p in existing)} already hold rows; pass "
                    "resume_step=k to continue after step k (0 to start over), or use a "
                    "new output directory")
        else:
            for p in (self.metrics_path, self.samples_path):
                _truncate_after(p, int(resume_step))

        self._writer = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as e:
                raise ImportError("tensorboard=True needs the tensorboardX package "
                                  "(pip install tensorboardX), or pass tensorboard=False") from e
            # purge_step makes TensorBoard discard older events at steps >= it: the
            # event-file counterpart of the JSON truncation above.
            purge = None if resume_step is None else int(resume_step) + 1
            self._writer = SummaryWriter(logdir=str(self.output_dir / TENSORBOARD_DIR),
                                         purge_step=purge)
        self._metrics_f: IO[str] | None = None
        self._samples_f: IO[str] | None = None
        self._closed = False

    def _open(self, which: str) -> IO[str]:
        if self._closed:
            raise ValueError("MetricsLogger is closed")
        attr, path = (("_metrics_f", self.metrics_path) if which == "metrics"
                      else ("_samples_f", self.samples_path))
        f = getattr(self, attr)
        if f is None:
            f = open(path, "a", encoding="utf-8")
            setattr(self, attr, f)
        return f

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Append one metrics row; -> the row as written (non-finite values as None)."""
        step = _step(step)
        if "step" in metrics:
            raise ValueError("metrics must not contain a 'step' key; pass the step separately")
        values = {str(k): _scalar(str(k), v) for k, v in metrics.items()}
        row = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
        f = self._open("metrics")
        # one write per row keeps a kill from interleaving parts of two rows
        f.write(json.dumps(row, allow_nan=False) + "\n")
        f.flush()
        if self._writer is not None:
            for k, v in values.items():
                # non-finite values are skipped (a gap, as in the JSON's null): tensorboardX
                # would print a warning per value and step
                if math.isfinite(v):
                    self._writer.add_scalar(k, v, global_step=step)
            self._writer.flush()
        return row

    def log_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append sample rows, each tagged with `step`."""
        step = _step(step)
        lines = []
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ValueError(f"sample row {i} is a {type(row).__name__}, not a dict")
            if "step" in row:
                raise ValueError(f"sample row {i} has its own 'step' key; it is added here")
            lines.append(json.dumps({"step": step, **_json_safe(dict(row))}, allow_nan=False,
                                    ensure_ascii=False))
        if not lines:
            return
        f = self._open("samples")
        f.write("".join(line + "\n" for line in lines))
        f.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for f in (self._metrics_f, self._samples_f):
            if f is not None:
                f.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Progress bar

# (metrics key, postfix label, format)
_POSTFIX = (("sft/loss", "sft loss", "{:.3f}"),
            ("reward/mean", "reward", "{:.3f}"), ("format_rate", "format", "{:.0%}"),
            ("kl", "kl", "{:.4f}"), ("tokens_per_s", "tok/s", "{:.0f}"))


class Progress:
    """Training progress on stderr (`file`): on a terminal a tqdm bar (postfix: SFT loss,
    reward, format rate, KL, tokens/s; ETA from tqdm); off one (a log file, a batch
    job) one plain line per step and per `note` (phase boundaries, evaluations), so
    `train > log 2>&1` shows where the run is without carriage returns.

    enabled=None picks by whether `file` is a terminal; True forces the bar; False
    prints nothing (processes other than 0); "lines" forces the plain lines.
    """

    def __init__(self, total: int, *, initial: int = 0, enabled: bool | str | None = None,
                 file: IO[str] | None = None, desc: str = "train"):
        self._file = sys.stderr if file is None else file
        if enabled is None:
            enabled = True if getattr(self._file, "isatty", lambda: False)() else "lines"
        self._lines = enabled == "lines"
        self._quiet = enabled is False
        self.total, self.done, self._start_done = total, initial, initial
        self._last, self._step_seconds = time.monotonic(), 0.0
        self._bar = tqdm(total=total, initial=initial, disable=self._lines or self._quiet,
                         file=self._file, desc=desc, unit="step", dynamic_ncols=True)

    def _postfix(self, metrics: Mapping[str, Any]) -> dict[str, str]:
        postfix = {}
        for key, label, fmt in _POSTFIX:
            if key in metrics:
                try:
                    v = _scalar(key, metrics[key])
                except ValueError:
                    continue  # progress never stops training
                postfix[label] = fmt.format(v) if math.isfinite(v) else str(v)
        return postfix

    def update(self, metrics: Mapping[str, Any] | None = None, n: int = 1,
               phase: str | None = None) -> None:
        now = time.monotonic()
        # The step's own time when it reports one (not the evaluation before it).
        step_time = (metrics or {}).get("step_time_s", now - self._last)
        self._last = now
        self.done += n
        self._step_seconds += float(step_time)
        if self._lines:
            parts = [f"{phase + ' ' if phase else ''}step {self.done}/{self.total}"]
            parts += [f"{k} {v}" for k, v in self._postfix(metrics or {}).items()]
            parts.append(f"{float(step_time):.1f} s")
            if self.done < self.total:
                rate = self._step_seconds / max(self.done - self._start_done, 1)
                parts.append(f"ETA {format_duration(rate * (self.total - self.done))}")
            self._print(" | ".join(parts))
            return
        if metrics:
            self._bar.set_postfix(self._postfix(metrics), refresh=False)
        self._bar.update(n)

    def note(self, text: str) -> None:
        """A line about the run (a phase begins, an evaluation ends): plain, or above
        the bar without breaking it."""
        if not self._quiet:
            if self._lines:
                self._print(text)
            else:
                self._bar.write(text, file=self._file)
        self._last = time.monotonic()

    def _print(self, text: str) -> None:
        print(text, file=self._file, flush=True)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_duration(seconds: float) -> str:
    """12 s, 4m 05s, 2h 03m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"
