"""`train --dry-run`: the v5e-8 preset compiles for a TPU v5e 2x4 topology (libtpu's
compile-only devices) within a chip's memory; bad input is one line before any compile."""
from __future__ import annotations

import dataclasses
import json

import pytest

from grpo_jax import dry_run, presets, sharding, train
from grpo_jax.config import MeshConfig
from grpo_jax.presets import train_preset

pytestmark = pytest.mark.xdist_group("tpu-compile")
V5E_HBM = 16e9  # bytes per chip (16 GB; the datasheet's 16 GiB is a little more)


def test_v5e8_preset_step_and_sampler_compile_for_the_v5e_topology_within_a_chip():
    """The preset's own attention (the Pallas kernels): they lower through Mosaic inside
    the sharded update and decode loop (a lowering error fails here). Both
    implementations side by side are the tiny CLI test's; the XLA path of this preset
    is docs/tpu.md's (compiling it too would add ~4 minutes to CI)."""
    pytest.importorskip("libtpu")
    cfg = train_preset("v5e-8-gemma3-1b")
    assert cfg.attention == "pallas"
    report = dry_run.dry_run(cfg, "v5e:2x4", names=("update", "decode"), cost_twins=False,
                             compare=())
    assert "TPU v5" in report["target"]
    assert report["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert list(report["by_attention"]) == ["pallas"]
    for name in ("update", "decode"):
        row = report["programs"][name]
        assert 0 < row["peak"] < V5E_HBM, (name, row)
        assert row["flops"] > 0 and row["bytes_accessed"] > 0, (name, row)
    # Per chip: the bf16 weights (2.0 GB) replicated, the KV cache of 8 of the 64 rows.
    assert 2.0e9 < report["programs"]["decode"]["arguments"] < 3.0e9
    # Flash attention keeps no [rows, 4, T, T] scores: the update's temporaries stay
    # under the 4.19 GiB XLA's path needs (docs/tpu.md: 3.59 GiB).
    assert report["programs"]["update"]["temporaries"] < 4.0 * 2 ** 30


def test_fsdp_splits_the_weights_over_chips():
    pytest.importorskip("libtpu")
    cfg = dataclasses.replace(train_preset("v5e-8-gemma3-1b"), mesh=MeshConfig(data=2, fsdp=4))
    report = dry_run.dry_run(cfg, "v5e:2x4", names=("decode_step",), cost_twins=False,
                             compare=())
    # The 2.0 GB of bf16 weights over fsdp 4: about 0.5 GB of arguments a chip.
    assert report["programs"]["decode_step"]["arguments"] < 1.0e9


def test_tiny_dry_run_cli_prints_figures(capsys, tmp_path):
    pytest.importorskip("libtpu")
    report = tmp_path / "dry.json"
    assert train.main(["--preset", "tiny", "--dry-run", "--dry-run-json", str(report),
                       "--grpo.num-prompts", "4"]) == 0
    out = capsys.readouterr().out
    assert "compile-only" in out and "decode_step" in out and "roofline" in out
    assert "attention xla (the run's own)" in out and "attention pallas:" in out
    written = json.loads(report.read_text())
    assert written["batch"]["prompts"] == 4 and list(written["by_attention"]) == ["xla", "pallas"]
    # The tiny preset cuts prompts to 96 tokens (data.max_prompt_tokens): its width.
    assert written["prompt_len"] == 96 and "prompts 96 tokens" in out


def test_dry_run_cli_hands_its_options_and_the_run_flags_on(monkeypatch, tmp_path):
    """Its own command: `--dry-run-attention` with no names compares nothing, the run's
    flags set the config. What `dry_run` then compiles is the tests' above."""
    seen = {}

    def fake_dry_run(cfg, topology, compare):
        seen.update(cfg=cfg, topology=topology, compare=compare)
        return {"batch": {"prompts": cfg.grpo.num_prompts}}

    monkeypatch.setattr(dry_run, "dry_run", fake_dry_run)
    report = tmp_path / "dry.json"
    assert dry_run.main(["--preset", "tiny", "--dry-run-attention", "--dry-run-json",
                         str(report), "--grpo.num-prompts", "4", "--topology", "v5e:2x2"]) == 0
    assert seen["compare"] == () and seen["topology"] == "v5e:2x2"
    assert seen["cfg"].preset == "tiny" and seen["cfg"].grpo.num_prompts == 4
    assert json.loads(report.read_text()) == {"batch": {"prompts": 4}}
    assert dry_run.main(["--preset", "tiny", "--grpo.num-prompts", "4"]) == 0
    assert seen["compare"] == dry_run.ATTENTION_IMPLS  # by default, every implementation


def test_dry_run_help_names_its_options_and_the_run_flags(capsys):
    with pytest.raises(SystemExit) as e:
        dry_run.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--topology" in out and "--dry-run-attention" in out and "--grpo.num-prompts" in out


def test_without_libtpu_it_compiles_for_cpu_devices_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(dry_run, "has_libtpu", lambda: False)
    cfg = dataclasses.replace(train_preset("tiny"))
    report = dry_run.dry_run(cfg, names=("reference", "decode_step"), cost_twins=False)
    assert "CPU figures" in report["target"] and "estimates" not in report
    assert list(report["by_attention"]) == ["xla"]  # a TPU kernel would be interpreted
    assert report["programs"]["reference"]["peak"] > 0
    too_big = dataclasses.replace(cfg, mesh=MeshConfig(data=2))
    with pytest.raises(dry_run.DryRunError, match="JAX_NUM_CPU_DEVICES=2"):
        dry_run.dry_run(too_big)


@pytest.mark.parametrize("topology, message", [
    ("v9z:2x4", "expected one of v5e:AxB"),
    ("v5e:2xfour", "the shape must be like 2x4"),
    ("v5e:3x7", "libtpu cannot compile for it"),
])
def test_unknown_topology_is_one_line(capsys, topology, message):
    pytest.importorskip("libtpu")
    assert train.main(["--preset", "tiny", "--dry-run", "--topology", topology]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --topology") and message in err[0], err


def test_shapes_the_mesh_cannot_divide_are_one_line_before_compiling(capsys):
    base = train_preset("v5e-8-gemma3-1b")
    cases = [
        (["--grpo.num-prompts", "12", "--grpo.micro-batch", "0"], "--grpo.num-prompts (prompts "
         "prefilled) of 12 rows does not divide over --mesh.data 8 x --mesh.fsdp 1 = 8 devices"),
        (["--grpo.micro-batch", "16"], "a GRPO micro-batch (packed: 4 completions a row) of 4 "
         "rows does not divide"),
        (["--mesh.data", "1", "--mesh.fsdp", "1", "--mesh.tensor", "8"],
         "--mesh.tensor 8 does not divide gemma3-1b's 4 query heads"),
        (["--mesh.fsdp", "2"], "= 16 devices, but this process has 8"),
    ]
    for flags, message in cases:
        cfg = presets.parse_run_config(["--preset", "v5e-8-gemma3-1b", *flags])
        with pytest.raises(ValueError, match=None) as e:
            sharding.check_run(cfg, dry_run.run_model_config(cfg), 8)
        assert message in str(e.value), (flags, str(e.value))
    sharding.check_run(base, dry_run.run_model_config(base), 8)
