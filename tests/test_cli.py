"""A user's first contact: the commands start quietly on a machine without a TPU, even
with libtpu installed (the dry run needs it), and JAX_PLATFORMS is respected."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_jax import cli

ROOT = Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _run(args: list[str], *, platforms: str | None = None, timeout: int = 600):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["JAX_COMPILATION_CACHE_DIR"] = ""
    if platforms is not None:
        env["JAX_PLATFORMS"] = platforms
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


PROBE = ("from grpo_jax import cli; print(cli.choose_platforms()); "
         "import jax; print(jax.devices()[0].platform)")


@pytest.mark.skipif(cli.tpu_present(), reason="this machine has a TPU")
def test_without_a_tpu_the_platforms_leave_the_tpu_out():
    result = _run(["-c", PROBE])
    assert result.returncode == 0, result.stderr
    chosen, platform = result.stdout.split()
    assert chosen.split(",")[-1] == "cpu" and "tpu" not in chosen
    assert platform in chosen.split(",")
    assert "libtpu" not in result.stderr and "TPU" not in result.stderr, result.stderr


def test_jax_platforms_is_respected():
    result = _run(["-c", PROBE], platforms="cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "cpu"]


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed: nothing to keep quiet")
@pytest.mark.skipif(cli.tpu_present(), reason="this machine has a TPU")
def test_commands_print_nothing_from_libtpu(tmp_path):
    """--help, a tiny run and a one-line error, each with JAX_PLATFORMS unset."""
    help_ = _run(["-m", "grpo_jax.train", "--help"])
    assert help_.returncode == 0 and help_.stdout.startswith("usage:"), help_.stderr
    assert help_.stderr == ""

    run = _run(["-m", "grpo_jax.train", "--preset", "tiny", "--output-dir",
                str(tmp_path / "run"), "--steps", "1", "--eval-problems", "0"])
    assert run.returncode == 0, run.stderr[-3000:]
    # Off a terminal stderr holds the run's own progress lines and nothing else.
    lines = run.stderr.splitlines()
    assert lines and all(line.startswith(("GRPO:", "grpo step")) for line in lines), lines

    error = _run(["-m", "grpo_jax.train", "--preset", "tiny", "--grpo.num-prompts", "0"])
    assert error.returncode == 2
    assert error.stderr.splitlines() == ["error: grpo.num_prompts must be positive, got 0"]
