"""Merged-weight export: the HF tensor mapping inverts the loader exactly, a trained
tiny run exports to a checkpoint that equals merge(base, LoRA) and that transformers
loads with the same log-probs; bad input fails with one line, exit 2."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from digit_reward_train import digit_fraction
from grpo_jax import export, rewards, runs, train
from grpo_jax.model.config import model_preset
from grpo_jax.presets import TRAIN_PRESETS
from grpo_jax.rewards import RewardConfig
from grpo_jax.model import gemma3, hf_layout, lora as lora_lib, weights

REPO = Path(__file__).resolve().parents[1]
TINY = model_preset("tiny")
# Every mapping choice differs from TINY: MQA, head_dim != D / H, a global layer every
# 3rd, 8x linear RoPE on global layers, a non-default query scale and local theta.
TINY_MQA = dataclasses.replace(
    TINY, name="tiny-mqa", num_layers=3, num_kv_heads=1, head_dim=24, global_every=3,
    sliding_window=3, rope_scale_global=8.0, query_pre_attn_scalar=24.0, rope_base_local=500.0)


def _assert_trees_equal(a, b, atol=0.0):
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for (path, x), y in zip(flat_a, flat_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape, jax.tree_util.keystr(path)
        if atol:
            np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("cfg", [TINY, TINY_MQA], ids=lambda c: c.name)
def test_hf_tensors_round_trip_exactly(cfg):
    params = gemma3.init_params(cfg, jax.random.key(3))
    tensors = hf_layout.hf_tensors_from_params(params, cfg)
    assert "lm_head.weight" not in tensors  # tied to the embedding
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (
        cfg.num_heads * cfg.head_dim, cfg.embed_dim)
    assert all(t.flags.c_contiguous for t in tensors.values())
    _assert_trees_equal(weights.params_from_hf_tensors(tensors, cfg), params)


# ---------------------------------------------------------------------------
# transformers reads what we write


def _our_log_probs(params, cfg, rows) -> np.ndarray:
    tokens = jnp.asarray(rows, jnp.int32)
    mask = jnp.ones_like(tokens, bool)
    logits = jax.jit(gemma3.forward, static_argnames="cfg")(
        params, tokens, gemma3.left_padded_positions(mask), mask, cfg=cfg)
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))


def _hf_log_probs(out_dir, rows) -> np.ndarray:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.Gemma3ForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor(rows)).logits
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def _rows(cfg, n=3, length=11):  # longer than every sliding window here
    return np.random.default_rng(0).integers(0, cfg.vocab_size, size=(n, length)).tolist()


def test_config_and_names_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = TINY_MQA
    hf_cfg = transformers.Gemma3TextConfig.from_dict(hf_layout.hf_config_dict(cfg))
    assert hf_cfg.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert hf_cfg.rope_parameters["full_attention"] == {
        "rope_type": "linear", "factor": 8.0, "rope_theta": cfg.rope_base_global}
    assert hf_cfg.rope_parameters["sliding_attention"]["rope_theta"] == cfg.rope_base_local
    assert (hf_cfg.query_pre_attn_scalar, hf_cfg.head_dim, hf_cfg.sliding_window) == (24, 24, 3)
    # Same tensor names and shapes as transformers' own model (lm_head is tied).
    model = transformers.Gemma3ForCausalLM(hf_cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    ours = hf_layout.hf_tensors_from_params(gemma3.init_params(cfg, jax.random.key(0)), cfg)
    assert {k: v.shape for k, v in ours.items()} == want


def test_written_checkpoint_matches_transformers(tmp_path):
    """Random weights on the config that exercises every mapping (RoPE scaling, MQA...)."""
    cfg = TINY_MQA
    params = gemma3.init_params(cfg, jax.random.key(1))
    out = export.write_hf_checkpoint(tmp_path / "hf", params, cfg)
    rows = _rows(cfg)
    diff = np.abs(_our_log_probs(params, cfg, rows) - _hf_log_probs(out, rows)).max()
    assert diff < 1e-4, diff


def test_tokenizer_model_is_written(tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    from grpo_jax.tokenizer import Tokenizer

    T = pb.ModelProto.SentencePiece.Type
    proto = pb.ModelProto()
    for piece, kind in [("<pad>", T.CONTROL), ("<eos>", T.CONTROL), ("<bos>", T.CONTROL),
                        ("<unk>", T.UNKNOWN), ("\u2581", T.NORMAL), ("a", T.NORMAL),
                        ("b", T.NORMAL), ("ab", T.NORMAL)]:
        proto.pieces.add(piece=piece, score=0.0 if kind != T.NORMAL else -len(proto.pieces),
                         type=kind)
    ts = proto.trainer_spec
    ts.model_type, ts.vocab_size = pb.TrainerSpec.BPE, len(proto.pieces)
    ts.pad_id, ts.eos_id, ts.bos_id, ts.unk_id = 0, 1, 2, 3
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    tok = Tokenizer.from_model_proto(proto)

    out = export.write_hf_checkpoint(tmp_path / "hf", gemma3.init_params(TINY, jax.random.key(0)),
                                     TINY, tokenizer=tok, stop_ids=(1, 106))
    back = Tokenizer.from_file(out / "tokenizer.model")
    assert back.encode("ab a") == tok.encode("ab a") == [2, 7, 4, 5]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 106]
    # tokenizer_config.json makes transformers add BOS as we do.
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoTokenizer.from_pretrained(out)("ab a").input_ids == [2, 7, 4, 5]


# ---------------------------------------------------------------------------
# A trained tiny run, end to end


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    # A reward random text earns unevenly: groups have advantages, so LoRA's B moves.
    rewards.register_reward("digit_fraction", digit_fraction)
    cfg = dataclasses.replace(TRAIN_PRESETS["tiny"], tensorboard=False, eval_problems=0,
                              output_dir=str(run), steps=2,
                              rewards=RewardConfig(functions=(("digit_fraction", 1.0),)))
    train.train(cfg)
    return run, cfg


def _merged_reference(run, cfg):
    model_cfg, params, _ = runs.load_run_base(cfg)
    lora, step = runs.restore_lora(run, cfg, model_cfg)
    return model_cfg, params, lora, step


def test_export_equals_merge_and_transformers(trained_run, tmp_path):
    run, cfg = trained_run
    model_cfg, params, lora, step = _merged_reference(run, cfg)
    assert step == 2
    # Two GRPO updates moved B off its zero init, so the export is not just the base.
    assert any(np.abs(np.asarray(x["b"])).max() > 0
               for layer in lora.layers for block in layer.values() for x in block.values())
    merged = lora_lib.merge(params, lora)

    out = export.export_merged(run, out_dir=tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]  # bytes: no tokenizer
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary sibling left behind
    loaded = weights.load_safetensors(out, model_cfg)
    _assert_trees_equal(loaded, merged, atol=1e-6)
    assert not np.array_equal(loaded["layers"][0]["attn"]["q"], params["layers"][0]["attn"]["q"])

    rows = _rows(model_cfg)
    diff = np.abs(_our_log_probs(merged, model_cfg, rows) - _hf_log_probs(out, rows)).max()
    assert diff < 1e-4, diff


def test_a_bfloat16_run_is_merged_in_float32(trained_run):
    """A run that computed in bfloat16 (`--dtype auto` on an AVX-512 BF16 CPU) is
    merged from the float32 base: the export's --dtype alone rounds it."""
    run, cfg = trained_run
    model_cfg, params, lora, _ = _merged_reference(run, cfg)
    got_cfg, merged, _, step = export._merged_policy(run, dataclasses.replace(
        cfg, dtype="bfloat16"), 2)
    assert step == 2 and got_cfg.dtype == "float32"
    _assert_trees_equal(merged, lora_lib.merge(params, lora))


def test_export_step_bfloat16_overwrite(trained_run, tmp_path):
    run, cfg = trained_run
    model_cfg, params, lora, _ = _merged_reference(run, cfg)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    with pytest.raises(export.ExportError, match="not empty"):
        export.export_merged(run, out_dir=out, checkpoint_step=2)
    export.export_merged(run, out_dir=out, checkpoint_step=2, dtype="bfloat16", overwrite=True)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    want = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32),
                        lora_lib.merge(params, lora))
    _assert_trees_equal(weights.load_safetensors(out, model_cfg), want)


# ---------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2


def _one_line_error(capsys, argv) -> str:
    assert export.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_cli_missing_run_dir_via_script(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "export_merged.py"), "--run-dir",
         str(tmp_path / "nope"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == f"error: run directory not found: {tmp_path / 'nope'}"
    assert not (tmp_path / "out").exists()


def test_cli_bad_input(trained_run, tmp_path, capsys):
    run, _ = trained_run
    bare = tmp_path / "bare"  # a run directory that never reached a checkpoint
    bare.mkdir()
    (bare / "config.json").write_text((run / "config.json").read_text())
    assert "no checkpoints in" in _one_line_error(
        capsys, ["--run-dir", str(bare), "--out", str(tmp_path / "o")])
    assert not (bare / "checkpoints").exists()  # looking did not create it
    assert "config.json not found" in _one_line_error(
        capsys, ["--run-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "available steps: 2" in _one_line_error(
        capsys, ["--run-dir", str(run), "--out", str(tmp_path / "o"), "--step", "1"])
    assert "float32, bfloat16" in _one_line_error(
        capsys, ["--run-dir", str(run), "--out", str(tmp_path / "o"), "--dtype", "float16"])
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    assert "--overwrite" in _one_line_error(
        capsys, ["--run-dir", str(run), "--out", str(tmp_path / "o")])
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"
    # Even with --overwrite, the run itself is never the thing replaced.
    assert "run directory" in _one_line_error(
        capsys, ["--run-dir", str(run), "--out", str(run.parent), "--overwrite"])
    assert (run / "checkpoints").is_dir()
