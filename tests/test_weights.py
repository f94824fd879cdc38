"""Checkpoint loaders on tiny checkpoints written here: HF safetensors (single,
sharded, bf16), Gemma Flax/orbax (Kaggle layout, kv_einsum and qkv_einsum), GGUF
(F32 and Q8_0), and one-line `CheckpointError`s for every broken input.

Each layout conversion below is restated from the formats' own conventions in
NumPy, independently of `grpo_jax.model.weights`.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.model.config import TINY
from grpo_jax.model import gemma3, weights
from grpo_jax.model.weights import CheckpointError

_forward = jax.jit(gemma3.forward, static_argnums=4)

# Longer than TINY.sliding_window (4), so local and global layers differ.
_TOKENS = np.array([[2, 17, 300, 5, 99, 411, 7, 8, 256, 31, 64, 1],
                    [2, 480, 3, 3, 12, 140, 141, 142, 9, 77, 500, 6]], np.int32)


def _random_params(cfg, seed=0):
    return jax.tree.map(np.asarray, gemma3.init_params(cfg, jax.random.key(seed)))


def _logits(params, cfg):
    tokens = jnp.asarray(_TOKENS % cfg.vocab_size)
    mask = jnp.ones_like(tokens, bool)
    return np.asarray(_forward(params, tokens, gemma3.left_padded_positions(mask), mask, cfg))


def _assert_loaded(loaded, params, cfg, atol=0.0):
    chex.assert_trees_all_equal_shapes_and_dtypes(loaded, jax.tree.map(
        lambda x: np.asarray(x, cfg.weight_dtype), params))
    chex.assert_trees_all_close(loaded, params, atol=atol, rtol=0)
    chex.assert_trees_all_close(_logits(loaded, cfg), _logits(params, cfg),
                                atol=max(1e-5, 100 * atol), rtol=0)


# ---------------------------------------------------------------------------
# Canonical params -> each format's layout (independent restatements)


def to_hf(params, cfg) -> dict[str, np.ndarray]:
    """HF Gemma3ForCausalLM names; nn.Linear weights are [out, in]."""
    h, k, dh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
    out = {"model.embed_tokens.weight": params["embed"],
           "model.norm.weight": params["final_norm"],
           "lm_head.weight": params["embed"]}
    for i, lp in enumerate(params["layers"]):
        a, m, p = lp["attn"], lp["mlp"], f"model.layers.{i}."
        out |= {
            # q [D, H, Dh] -> q_proj [H*Dh, D]: row h*Dh + j is head h, dim j.
            p + "self_attn.q_proj.weight": a["q"].reshape(d, h * dh).T,
            p + "self_attn.k_proj.weight": a["k"].reshape(d, k * dh).T,
            p + "self_attn.v_proj.weight": a["v"].reshape(d, k * dh).T,
            # o [H, Dh, D] -> o_proj [D, H*Dh].
            p + "self_attn.o_proj.weight": a["o"].reshape(h * dh, d).T,
            p + "self_attn.q_norm.weight": a["q_norm"],
            p + "self_attn.k_norm.weight": a["k_norm"],
            p + "input_layernorm.weight": lp["pre_attn_norm"],
            p + "post_attention_layernorm.weight": lp["post_attn_norm"],
            p + "pre_feedforward_layernorm.weight": lp["pre_ffw_norm"],
            p + "post_feedforward_layernorm.weight": lp["post_ffw_norm"],
            p + "mlp.gate_proj.weight": m["gate"].T,
            p + "mlp.up_proj.weight": m["up"].T,
            p + "mlp.down_proj.weight": m["down"].T,
        }
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def to_orbax(params, cfg, *, qkv: bool = False, nested: bool = False) -> dict:
    """Official Gemma Flax checkpoint tree ('transformer/layer_N/attn/q_einsum' -> {'w': ...})."""
    tree = {"transformer/embedder": {"input_embedding": params["embed"]},
            "transformer/final_norm": {"scale": params["final_norm"]}}
    heads_first = lambda w: w.transpose(1, 0, 2)  # noqa: E731  [D, N, Dh] -> [N, D, Dh]
    for i, lp in enumerate(params["layers"]):
        a, m, p = lp["attn"], lp["mlp"], f"transformer/layer_{i}/"
        if qkv:
            assert cfg.num_heads == cfg.num_kv_heads
            tree[p + "attn/qkv_einsum"] = {
                "w": np.stack([heads_first(a["q"]), heads_first(a["k"]), heads_first(a["v"])])}
        else:
            tree[p + "attn/q_einsum"] = {"w": heads_first(a["q"])}
            tree[p + "attn/kv_einsum"] = {"w": np.stack([heads_first(a["k"]), heads_first(a["v"])])}
        tree |= {
            p + "attn/attn_vec_einsum": {"w": a["o"]},
            p + "attn/_query_norm": {"scale": a["q_norm"]},
            p + "attn/_key_norm": {"scale": a["k_norm"]},
            p + "mlp/gating_einsum": {"w": np.stack([m["gate"].T, m["up"].T])},
            p + "mlp/linear": {"w": m["down"]},
            p + "pre_attention_norm": {"scale": lp["pre_attn_norm"]},
            p + "post_attention_norm": {"scale": lp["post_attn_norm"]},
            p + "pre_ffw_norm": {"scale": lp["pre_ffw_norm"]},
            p + "post_ffw_norm": {"scale": lp["post_ffw_norm"]},
        }
    tree = jax.tree.map(np.ascontiguousarray, tree)
    if not nested:
        return tree
    out: dict = {}
    for path, leaf in tree.items():
        node = out
        for part in path.split("/"):
            node = node.setdefault(part, {})
        node.update(leaf)
    return out


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def to_gguf_tensors(params, cfg) -> dict[str, np.ndarray]:
    """llama.cpp names; matrices in HF [out, in]; norm weights stored as 1 + scale."""
    out = {}
    for name, w in to_hf(params, cfg).items():
        if name == "lm_head.weight":
            continue  # tied: llama.cpp writes no output.weight for Gemma
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{_GGUF_NAMES[rest.removesuffix('.weight')]}.weight"
        if gname.endswith("norm.weight"):
            w = w + np.float32(1.0)
        out[gname] = np.ascontiguousarray(w, np.float32)
    return out


def write_gguf(path: Path, params, cfg, *, q8_0: tuple[str, ...] = (), skip: tuple[str, ...] = (),
               tokens: list[str] | None = None, token_types: list[int] | None = None):
    import gguf

    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name("tiny-test")
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(128)
    writer.add_embedding_length(cfg.embed_dim)
    writer.add_feed_forward_length(cfg.ffw_dim)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    writer.add_rope_freq_base(cfg.rope_base_global)
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens or [f"<t{i}>" for i in range(cfg.vocab_size)])
    if token_types is not None:
        writer.add_token_types(token_types)
        for name, value in dict(pad=0, eos=1, bos=2, unk=3).items():
            getattr(writer, f"add_{name}_token_id")(value)
    for name, w in to_gguf_tensors(params, cfg).items():
        if name in skip:
            continue
        if name in q8_0:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], shards: int = 1) -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    n = len(names)
    weight_map = {}
    for s in range(shards):
        fname = (f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1
                 else "model.safetensors")
        part = names[s * n // shards:(s + 1) * n // shards]
        save_file({k: tensors[k] for k in part}, str(path / fname), metadata={"format": "pt"})
        weight_map |= {k: fname for k in part}
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    return path


def save_orbax(path: Path, tree) -> Path:
    import orbax.checkpoint as ocp

    ocp.PyTreeCheckpointer().save(path, tree)
    return path


@pytest.fixture(scope="module")
def params():
    return _random_params(TINY, seed=0)


# ---------------------------------------------------------------------------
# Hugging Face safetensors


def test_hf_layout_restatement_is_exact(params):
    """The in-memory HF conversion (no file) round-trips through the loader's mapping."""
    loaded = weights.params_from_hf_tensors(to_hf(params, TINY), TINY)
    chex.assert_trees_all_equal(loaded, params)


def test_safetensors_directory(tmp_path, params):
    ckpt = write_safetensors(tmp_path / "hf", to_hf(params, TINY))
    assert weights.detect_checkpoint_format(ckpt) == "safetensors"
    _assert_loaded(weights.load_safetensors(ckpt, TINY), params, TINY)
    chex.assert_trees_all_equal(weights.load_params(ckpt, TINY), params)
    # A single file works too.
    chex.assert_trees_all_equal(weights.load_params(ckpt / "model.safetensors", TINY), params)


def test_safetensors_sharded(tmp_path, params):
    ckpt = write_safetensors(tmp_path / "hf", to_hf(params, TINY), shards=2)
    assert len(list(ckpt.glob("*.safetensors"))) == 2
    chex.assert_trees_all_equal(weights.load_params(ckpt, TINY), params)


def test_safetensors_multimodal_prefix(tmp_path, params):
    """Gemma 3 4B+ checkpoints nest the text decoder under `language_model`; vision is ignored."""
    tensors = {k.replace("model.", "model.language_model.", 1): v
               for k, v in to_hf(params, TINY).items() if k.startswith("model.")}
    tensors["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = \
        np.zeros((4, 3), np.float32)
    chex.assert_trees_all_equal(weights.params_from_hf_tensors(tensors, TINY), params)


def test_safetensors_bf16(tmp_path, params):
    from safetensors.flax import save_file

    ckpt = tmp_path / "hf"
    ckpt.mkdir()
    save_file({k: jnp.asarray(v, jnp.bfloat16) for k, v in to_hf(params, TINY).items()},
              str(ckpt / "model.safetensors"))
    header_len = int.from_bytes((ckpt / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((ckpt / "model.safetensors").read_bytes()[8:8 + header_len])
    assert header["model.embed_tokens.weight"]["dtype"] == "BF16"

    rounded = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), params)
    loaded = weights.load_safetensors(ckpt, TINY)
    chex.assert_trees_all_equal(loaded, rounded)  # float32 config: bf16 values, upcast exactly
    chex.assert_trees_all_close(_logits(loaded, TINY), _logits(rounded, TINY), atol=1e-5)
    # A bf16-storage config keeps them as bf16.
    cfg16 = dataclasses.replace(TINY, param_dtype="bfloat16")
    loaded16 = weights.load_safetensors(ckpt, cfg16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(loaded16))
    chex.assert_trees_all_equal(jax.tree.map(lambda x: np.asarray(x, np.float32), loaded16),
                                rounded)


# ---------------------------------------------------------------------------
# Gemma Flax / orbax (Kaggle)


def test_orbax_slash_keys_round_trip(tmp_path, params):
    """Kaggle checkpoints key the top level by 'transformer/layer_0/attn/q_einsum': orbax keeps them."""
    import orbax.checkpoint as ocp

    tree = to_orbax(params, TINY)
    ckpt = save_orbax(tmp_path / "orbax", tree)
    restored = ocp.PyTreeCheckpointer().restore(ckpt.resolve())
    assert set(restored) == set(tree)
    assert "transformer/layer_0/attn/kv_einsum" in restored
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, restored), tree)


@pytest.mark.parametrize("nested", [False, True], ids=["slash_keys", "nested"])
def test_orbax_checkpoint(tmp_path, params, nested):
    ckpt = save_orbax(tmp_path / "orbax", to_orbax(params, TINY, nested=nested))
    assert weights.detect_checkpoint_format(ckpt) == "orbax"
    _assert_loaded(weights.load_orbax(ckpt, TINY), params, TINY)
    chex.assert_trees_all_equal(weights.load_params(ckpt, TINY), params)


def test_orbax_qkv_einsum(tmp_path):
    """Models with num_heads == num_kv_heads store q, k, v stacked as qkv_einsum [3, H, D, Dh]."""
    cfg = dataclasses.replace(TINY, num_kv_heads=TINY.num_heads)
    params = _random_params(cfg, seed=1)
    tree = to_orbax(params, cfg, qkv=True)
    assert tree["transformer/layer_0/attn/qkv_einsum"]["w"].shape == (
        3, cfg.num_heads, cfg.embed_dim, cfg.head_dim)
    assert "transformer/layer_0/attn/q_einsum" not in tree
    ckpt = save_orbax(tmp_path / "orbax", tree)
    _assert_loaded(weights.load_orbax(ckpt, cfg), params, cfg)


def test_orbax_tree_ignores_vision_tensors(params):
    tree = to_orbax(params, TINY)
    # Gemma 3 4B+ (multimodal) keys, as in the Kaggle checkpoints.
    tree["transformer/embedder"]["mm_input_embedding_extra"] = np.zeros((3, 4), np.float32)
    tree["transformer/embedder/mm_input_projection"] = {"w": np.zeros((3, 4), np.float32)}
    tree["transformer/embedder/mm_soft_embedding_norm"] = {"scale": np.zeros(3, np.float32)}
    tree["SigLiPFromPatches_0/siglip_encoder/Transformer/encoder_norm"] = {
        "scale": np.zeros(4, np.float32)}
    chex.assert_trees_all_equal(weights.params_from_orbax_tree(tree, TINY), params)


# ---------------------------------------------------------------------------
# GGUF


def test_gguf_f32(tmp_path, params):
    path = write_gguf(tmp_path / "tiny.gguf", params, TINY)
    assert weights.detect_checkpoint_format(path) == "gguf"
    # Norms come back from (1 + scale) - 1: float32 rounding only.
    _assert_loaded(weights.load_gguf(path, TINY), params, TINY, atol=1e-6)
    chex.assert_trees_all_close(weights.load_params(path, TINY), params, atol=1e-6, rtol=0)


def test_gguf_config(tmp_path, params):
    reader = weights.open_gguf(write_gguf(tmp_path / "tiny.gguf", params, TINY))
    cfg = weights.config_from_gguf(reader)
    assert cfg.name == "tiny-test"
    for field in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "ffw_dim", "sliding_window", "rms_eps", "rope_base_global",
                  "query_pre_attn_scalar"):
        assert getattr(cfg, field) == pytest.approx(getattr(TINY, field)), field
    # On top of a preset, the fields GGUF does not carry (name, layer pattern, local RoPE
    # base) come from the preset.
    on_preset = weights.config_from_gguf(reader, TINY)
    assert on_preset.rms_eps == pytest.approx(TINY.rms_eps)  # stored as float32
    assert dataclasses.replace(on_preset, rms_eps=TINY.rms_eps) == TINY
    # The reader object is accepted in place of a path.
    chex.assert_trees_all_close(weights.load_gguf(reader, TINY), params, atol=1e-6, rtol=0)


def test_gguf_wrong_architecture(tmp_path, params):
    import gguf

    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", params["embed"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf.GGUFReader(str(path)).fields["general.architecture"].contents() == "llama"
    with pytest.raises(CheckpointError, match="architecture is 'llama', expected 'gemma3'"):
        weights.config_from_gguf(weights.open_gguf(path))


def test_gguf_q8_0(tmp_path, params):
    import gguf

    quantized = ("token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight")
    path = write_gguf(tmp_path / "q8.gguf", params, TINY, q8_0=quantized)
    reader = weights.open_gguf(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert all(types[n] == gguf.GGMLQuantizationType.Q8_0 for n in quantized)
    assert types["blk.0.attn_k.weight"] == gguf.GGMLQuantizationType.F32

    loaded = weights.load_gguf(reader, TINY)
    # Exactly what Q8_0 round-trips to...
    expected = jax.tree.map(np.copy, params)
    q8 = lambda w: gguf.quants.dequantize(  # noqa: E731
        gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
    expected["embed"] = q8(params["embed"])
    expected["layers"][0]["attn"]["q"] = q8(to_hf(params, TINY)[
        "model.layers.0.self_attn.q_proj.weight"]).T.reshape(params["layers"][0]["attn"]["q"].shape)
    expected["layers"][1]["mlp"]["down"] = q8(params["layers"][1]["mlp"]["down"].T).T
    chex.assert_trees_all_close(loaded, expected, atol=1e-6, rtol=0)
    # ... which is within Q8_0's step (max|block| / 127, blocks of 32) of the originals.
    for got, want in [(loaded["embed"], params["embed"]),
                      (loaded["layers"][0]["attn"]["q"], params["layers"][0]["attn"]["q"]),
                      (loaded["layers"][1]["mlp"]["down"], params["layers"][1]["mlp"]["down"])]:
        err = np.abs(got - want).max()
        assert 0 < err <= np.abs(want).max() / 127, err
    # And the model still computes nearly the same thing.
    want = _logits(params, TINY)
    np.testing.assert_allclose(_logits(loaded, TINY), want, atol=0.01 * np.abs(want).max())


# ---------------------------------------------------------------------------
# Errors: always CheckpointError, naming the problem


def test_shape_mismatch_names_tensor(tmp_path, params):
    # Orbax: a checkpoint whose layer-0 query has fewer heads than the config.
    tree = to_orbax(params, TINY)
    tree["transformer/layer_0/attn/q_einsum"]["w"] = tree[
        "transformer/layer_0/attn/q_einsum"]["w"][:2]
    with pytest.raises(CheckpointError, match=r"tensor layers/0/attn/q has shape \(64, 2, 16\), "
                                              r"but config 'tiny' expects \(64, 4, 16\)"):
        weights.load_orbax(save_orbax(tmp_path / "bad_q", tree), TINY)
    # Orbax: a config with fewer heads than the checkpoint.
    ckpt = save_orbax(tmp_path / "orbax", to_orbax(params, TINY))
    fewer_heads = dataclasses.replace(TINY, num_heads=2, num_kv_heads=2)
    with pytest.raises(CheckpointError, match=r"tensor layers/0/attn/o has shape \(4, 16, 64\).*"
                                              r"expects \(2, 16, 64\)"):
        weights.load_orbax(ckpt, fewer_heads)
    # HF: a wider MLP, and a different vocabulary.
    hf = write_safetensors(tmp_path / "hf", to_hf(params, TINY))
    with pytest.raises(CheckpointError, match=r"layers/0/mlp/down has shape \(128, 64\).*"
                                              r"expects \(256, 64\)"):
        weights.load_safetensors(hf, dataclasses.replace(TINY, ffw_dim=256))
    with pytest.raises(CheckpointError, match=r"tensor embed has shape \(512, 64\)"):
        weights.load_safetensors(hf, dataclasses.replace(TINY, vocab_size=1024))
    # HF head mismatch is caught while un-flattening the heads: names layer and tensor.
    with pytest.raises(CheckpointError, match=r"layer 0 self_attn\.[qo]_proj: shape \(64, 64\), "
                                              r"expected \((32, 64|64, 32)\)"):
        weights.load_safetensors(hf, fewer_heads)
    # More layers in the checkpoint than the config has.
    with pytest.raises(CheckpointError, match="has layer 3 but config 'tiny' has 3 layers"):
        weights.load_safetensors(hf, dataclasses.replace(TINY, num_layers=3))


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    for load, what in [(weights.load_safetensors, "safetensors checkpoint"),
                       (weights.load_orbax, "orbax checkpoint"),
                       (weights.load_gguf, "GGUF file"), (weights.load_params, "checkpoint")]:
        with pytest.raises(CheckpointError, match=f"{what} not found: .*nowhere"):
            load(missing, TINY)


@pytest.mark.parametrize("keep", [4, 200, 0.5], ids=["length", "header", "data"])
def test_truncated_safetensors(tmp_path, params, keep):
    ckpt = write_safetensors(tmp_path / "hf", to_hf(params, TINY))
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated") as e:
        weights.load_safetensors(ckpt, TINY)
    assert "\n" not in str(e.value)


def test_not_safetensors(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes((12).to_bytes(8, "little") + b"not json at all")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or not a safetensors"):
        weights.load_safetensors(f, TINY)


@pytest.mark.parametrize("keep", [0.01, 0.5, 0.999], ids=["header", "data", "last_bytes"])
def test_truncated_gguf(tmp_path, params, keep):
    path = write_gguf(tmp_path / "tiny.gguf", params, TINY)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"GGUF file .*tiny\.gguf \(truncated or corrupt\)") as e:
        weights.load_gguf(path, TINY)
    assert "\n" not in str(e.value)


def test_not_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"model\.gguf \(not a GGUF file\)"):
        weights.load_params(path, TINY)


def test_missing_tensor(tmp_path, params):
    tensors = to_hf(params, TINY)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    ckpt = write_safetensors(tmp_path / "hf", tensors)
    with pytest.raises(CheckpointError, match=r"1 tensors missing .*first: layers/1/mlp/down"):
        weights.load_safetensors(ckpt, TINY)

    tree = to_orbax(params, TINY)
    del tree["transformer/final_norm"]
    with pytest.raises(CheckpointError, match=r"missing .*first: final_norm"):
        weights.load_orbax(save_orbax(tmp_path / "orbax", tree), TINY)

    path = write_gguf(tmp_path / "noembd.gguf", params, TINY, skip=("token_embd.weight",))
    with pytest.raises(CheckpointError, match=r"missing .*first: embed\b"):
        weights.load_gguf(path, TINY)


def test_unexpected_tensor(params):
    tensors = to_hf(params, TINY)
    tensors["model.layers.0.self_attn.rotary.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensor layers\.N\.self_attn\.rotary"):
        weights.params_from_hf_tensors(tensors, TINY)
    tree = to_orbax(params, TINY)
    tree["transformer/layer_0/attn/bogus"] = {"w": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointError, match=r"unexpected orbax tensor layer_N/attn/bogus/w"):
        weights.params_from_orbax_tree(tree, TINY)


def test_non_finite_tensor(params):
    tensors = to_hf(params, TINY)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].copy()
    tensors["model.norm.weight"][3] = np.nan
    with pytest.raises(CheckpointError, match="final_norm holds non-finite values"):
        weights.params_from_hf_tensors(tensors, TINY)


def test_unknown_format(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "weights.bin").write_bytes(b"\0" * 16)
    (tmp_path / "model.pt").write_bytes(b"\0" * 16)
    for path in (empty, tmp_path / "other", tmp_path / "model.pt"):
        with pytest.raises(CheckpointError, match="not a GGUF file, a safetensors file/directory, "
                                                  "or an orbax checkpoint"):
            weights.detect_checkpoint_format(path)
        with pytest.raises(CheckpointError):
            weights.load_params(path, TINY)


def _vocabulary(size: int) -> tuple[list[str], list[int]]:
    """A GGUF vocabulary of `size` pieces (GGUF types: 1 normal, 3 control, 6 byte)."""
    pieces = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3)]
    pieces += [(f"<0x{b:02X}>", 6) for b in range(256)]
    pieces += [(f"w{i}", 1) for i in range(size - len(pieces))]
    return [p for p, _ in pieces], [t for _, t in pieces]


def test_tokenizer_must_cover_the_embedding(tmp_path, params):
    """A tokenizer with fewer pieces than embedding rows (sampled ids it cannot
    decode) or more (ids the model cannot embed) is refused at load, in one line;
    the CLI says it in one line with exit 2."""
    from grpo_jax.model.load import load_model
    from grpo_jax.tokenizer import Tokenizer

    tokens, types = _vocabulary(TINY.vocab_size)
    good = write_gguf(tmp_path / "good.gguf", params, TINY, tokens=tokens, token_types=types)
    loaded = load_model("tiny", gguf=good)
    assert loaded.tokenizer.vocab_size == loaded.params["embed"].shape[0] == TINY.vocab_size
    for size in (TINY.vocab_size - 100, TINY.vocab_size + 1):
        # A GGUF's own vocabulary sets its config's rows (a mismatch there is a tensor
        # shape error); a tokenizer given beside the weights is what can disagree.
        tokens, types = _vocabulary(size)
        other = write_gguf(tmp_path / f"v{size}.gguf", params, TINY, tokens=tokens,
                           token_types=types)
        tok_file = tmp_path / f"v{size}.model"
        tok_file.write_bytes(Tokenizer.from_gguf(other).model_proto().SerializeToString())
        with pytest.raises(CheckpointError, match=f"tokenizer \\({size} pieces.*does not match "
                                                  f"the model's {TINY.vocab_size} embedding rows"):
            load_model("tiny", gguf=good, tokenizer=tok_file)
    proc = subprocess.run([sys.executable, "-m", "grpo_jax.generate", "--gguf", str(good),
                           "--tokenizer", str(tok_file), "--model", "tiny", "--prompt", "hi"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tokenizer (513 pieces"), lines


# ---------------------------------------------------------------------------
# grpo_jax.model.gguf_fast: the package's reader and Q8_0 dequantizer, restated faster


def _metadata_gguf(path):
    """Every metadata shape the readers parse: strings (empty, non-ASCII), scalars, and
    arrays of strings, of each scalar type, and empty ones."""
    import gguf

    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_token_list(["<pad>", "", "▁héllo", "日本", "x" * 300])
    w.add_token_scores([0.0, -1.5, 2.25, float("-inf"), 3.0])
    w.add_token_types([3, 1, 1, 6, 1])
    w.add_array("test.u8", np.arange(7, dtype=np.uint8).tolist())
    w.add_key_value("test.bools", [True, False, True], gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.BOOL)
    w.add_key_value("test.i64", [-(2 ** 40), 5], gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.INT64)
    w.add_key_value("test.f64", [0.1, -2.0], gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.FLOAT64)
    w.add_key_value("test.one_string", ["only"], gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.STRING)
    w.add_string("test.s", "plain ünïcode")
    w.add_uint32("test.n", 7)
    w.add_float32("test.f", 0.5)
    w.add_bool("test.b", True)
    w.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _assert_same_reader(got, want):
    assert list(got.fields) == list(want.fields)
    for name, w in want.fields.items():
        g = got.fields[name]
        assert (g.offset, g.name, g.data, g.types) == (w.offset, w.name, w.data, w.types), name
        assert len(g.parts) == len(w.parts), name
        for a, b in zip(g.parts, w.parts, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
        assert g.contents() == w.contents(), name  # no NaN here: == is exact
    assert [(t.name, t.tensor_type, t.data_offset) for t in got.tensors] == \
        [(t.name, t.tensor_type, t.data_offset) for t in want.tensors]
    for a, b in zip(got.tensors, want.tensors, strict=True):
        np.testing.assert_array_equal(a.data, b.data)


def test_fast_gguf_reader_reads_what_the_package_reads(tmp_path, params):
    import gguf

    from grpo_jax.model.gguf_fast import FastGGUFReader

    for path in (_metadata_gguf(tmp_path / "meta.gguf"),
                 write_gguf(tmp_path / "tiny.gguf", params, TINY)):
        _assert_same_reader(FastGGUFReader(str(path)), gguf.GGUFReader(str(path)))
    fast = FastGGUFReader(str(tmp_path / "meta.gguf"))
    assert fast.fields["tokenizer.ggml.tokens"].contents() == [
        "<pad>", "", "▁héllo", "日本", "x" * 300]
    assert fast.fields["tokenizer.ggml.tokens"].contents(2) == "▁héllo"
    assert fast.fields["tokenizer.ggml.token_type"].contents(3) == 6
    assert fast.fields["test.i64"].contents() == [-(2 ** 40), 5]


def test_fast_gguf_reader_refuses_a_truncated_vocabulary(tmp_path):
    path = _metadata_gguf(tmp_path / "meta.gguf")
    data = path.read_bytes()
    # Cut inside the 300-byte piece: the string array runs past the end of the file.
    cut = data.index(b"x" * 300) + 100
    (tmp_path / "cut.gguf").write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        weights.open_gguf(tmp_path / "cut.gguf")


def test_fast_q8_0_dequantize_is_the_package_bit_for_bit():
    import gguf

    from grpo_jax.model.gguf_fast import dequantize

    q8 = gguf.GGMLQuantizationType.Q8_0
    rng = np.random.default_rng(0)
    w = rng.normal(size=(70, 96)).astype(np.float32) * np.logspace(-3, 2, 70)[:, None]
    w[3] = 0.0  # an all-zero block: scale 0
    blocks = gguf.quants.quantize(w, q8)
    raw = rng.integers(0, 256, size=(5, 3 * 34), dtype=np.uint8)  # any scale bits
    raw.reshape(-1, 34)[:, 1] &= 0x3B  # finite float16 scales (no inf / NaN exponents)
    for data in (blocks, raw, blocks[:1]):
        want = gguf.quants.dequantize(data, q8)
        got = dequantize(data, q8)
        assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    with pytest.raises(ValueError, match="not whole blocks"):
        dequantize(blocks[:, :33], q8)
    # Other types are the package's own.
    f16 = np.arange(8, dtype=np.float16).view(np.uint8)
    np.testing.assert_array_equal(dequantize(f16, gguf.GGMLQuantizationType.F16),
                                  np.arange(8, dtype=np.float32))
