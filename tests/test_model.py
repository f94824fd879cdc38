"""Gemma 3 forward numerics: an independent float64 NumPy restatement, left-padding
invariance, and log-prob parity with transformers (a tiny random model with a
4-token window, and the embedded 270M on real text)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.model.config import GEMMA3_270M, ModelConfig, TINY
from grpo_jax.model import gemma3, weights

_forward = jax.jit(gemma3.forward, static_argnums=4)
_hidden = jax.jit(gemma3.hidden_states, static_argnums=4)


@jax.jit
def _log_softmax(logits):
    return jax.nn.log_softmax(logits, axis=-1)


def _left_pad(rows: list[list[int]], pad_ids=None) -> tuple[jax.Array, jax.Array]:
    """Left-padded tokens and mask; pad slots get `pad_ids` (garbage) or 0."""
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32) if pad_ids is None else \
        np.array(pad_ids[:len(rows), :width], np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = r
        mask[i, width - len(r):] = True
    return jnp.asarray(tokens), jnp.asarray(mask)


def _logits_alone(params, cfg, ids) -> np.ndarray:
    """Float32 logits [T, V] of one unpadded sequence."""
    tokens, mask = _left_pad([list(ids)])
    return np.asarray(_forward(params, tokens, gemma3.left_padded_positions(mask), mask, cfg))[0]


def _logits_padded(params, cfg, rows, pad_ids=None) -> list[np.ndarray]:
    """One left-padded batch; each row's logits at its real positions."""
    tokens, mask = _left_pad(rows, pad_ids)
    logits = np.asarray(_forward(params, tokens, gemma3.left_padded_positions(mask), mask, cfg))
    return [logits[i, tokens.shape[1] - len(r):] for i, r in enumerate(rows)]


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------
# An independent float64 restatement of the Gemma 3 decoder


def reference_forward(params, tokens, cfg: ModelConfig) -> np.ndarray:
    """Logits [T, V] of one unpadded sequence, in float64, one head at a time."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    d, n_heads, n_kv, dh = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    tokens = np.asarray(tokens)
    seq = len(tokens)
    pos = np.arange(seq, dtype=np.float64)

    def rms(x, scale):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.rms_eps) * (1.0 + scale)

    def gelu_tanh(x):
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))

    def rope(x, base, scale):  # x [T, N, dh]; rotate (first half, second half) pairs
        half = dh // 2
        freq = base ** (-2.0 * np.arange(half) / dh)
        angle = (pos / scale)[:, None, None] * freq[None, None, :]
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * np.cos(angle) - b * np.sin(angle),
                               b * np.cos(angle) + a * np.sin(angle)], axis=-1)

    x = p["embed"][tokens] * np.sqrt(d)
    distance = pos[:, None] - pos[None, :]  # query pos - key pos
    for i, lp in enumerate(p["layers"]):
        is_global = (i + 1) % cfg.global_every == 0
        allowed = distance >= 0
        if not is_global:
            allowed &= distance < cfg.sliding_window
        base = cfg.rope_base_global if is_global else cfg.rope_base_local
        scale = cfg.rope_scale_global if is_global else 1.0

        a = lp["attn"]
        h = rms(x, lp["pre_attn_norm"])
        q = rope(rms(np.einsum("td,dnk->tnk", h, a["q"]), a["q_norm"]), base, scale)
        k = rope(rms(np.einsum("td,dnk->tnk", h, a["k"]), a["k_norm"]), base, scale)
        v = np.einsum("td,dnk->tnk", h, a["v"])
        out = np.zeros((seq, n_heads, dh))
        for head in range(n_heads):
            kv = head // (n_heads // n_kv)  # consecutive query heads share a kv head
            s = q[:, head] @ k[:, kv].T / np.sqrt(cfg.query_pre_attn_scalar)
            s = np.where(allowed, s, -np.inf)
            w = np.exp(s - s.max(axis=-1, keepdims=True))
            out[:, head] = (w / w.sum(axis=-1, keepdims=True)) @ v[:, kv]
        attn = out.reshape(seq, n_heads * dh) @ a["o"].reshape(n_heads * dh, d)
        x = x + rms(attn, lp["post_attn_norm"])

        m = lp["mlp"]
        h = rms(x, lp["pre_ffw_norm"])
        x = x + rms((gelu_tanh(h @ m["gate"]) * (h @ m["up"])) @ m["down"], lp["post_ffw_norm"])
    return rms(x, p["final_norm"]) @ p["embed"].T


# A second tiny shape: MQA, linear RoPE scaling on global layers, every 3rd layer global,
# a 3-token window and a query scalar that is not head_dim.
TINY_MQA = dataclasses.replace(
    TINY, name="tiny-mqa", num_layers=6, num_kv_heads=1, global_every=3, sliding_window=3,
    rope_scale_global=8.0, query_pre_attn_scalar=24.0, rope_base_local=500.0)


@pytest.fixture(scope="module")
def tiny_params():
    return {cfg.name: gemma3.init_params(cfg, jax.random.key(i))
            for i, cfg in enumerate((TINY, TINY_MQA))}


def _random_ids(seed, n, vocab):
    return np.random.default_rng(seed).integers(0, vocab, size=n).tolist()


@pytest.mark.parametrize("cfg", [TINY, TINY_MQA], ids=lambda c: c.name)
def test_forward_matches_float64_reference(tiny_params, cfg):
    params = tiny_params[cfg.name]
    rows = [_random_ids(seed, 19, cfg.vocab_size) for seed in range(2)]  # 19 > window
    tokens = jnp.asarray(rows, jnp.int32)
    mask = jnp.ones_like(tokens, bool)
    ours = np.asarray(_forward(params, tokens, gemma3.left_padded_positions(mask), mask, cfg))
    for row, ids in enumerate(rows):
        want = reference_forward(params, ids, cfg)
        np.testing.assert_allclose(ours[row], want, atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(_np_log_softmax(ours[row]), _np_log_softmax(want), atol=1e-4)


def test_reference_is_sensitive_to_the_window(tiny_params):
    """The comparison above would notice a wrong window: positions past it change."""
    params, ids = tiny_params[TINY.name], _random_ids(7, 12, TINY.vocab_size)
    narrow = reference_forward(params, ids, TINY)
    wide = reference_forward(params, ids, dataclasses.replace(TINY, sliding_window=5))
    window = TINY.sliding_window
    # Before position `window` no key is `window` back, so both agree; from there on they differ.
    np.testing.assert_array_equal(narrow[:window], wide[:window])
    assert np.abs(narrow[window:] - wide[window:]).max(axis=-1).min() > 1e-3
    assert not np.allclose(_logits_alone(params, dataclasses.replace(TINY, sliding_window=5), ids),
                           _logits_alone(params, TINY, ids), atol=1e-2)


@pytest.mark.parametrize("cfg", [TINY, TINY_MQA], ids=lambda c: c.name)
def test_left_padding_invariance(tiny_params, cfg):
    params = tiny_params[cfg.name]
    rows = [_random_ids(10 + i, n, cfg.vocab_size) for i, n in enumerate((1, 5, 11, 16))]
    # Padding slots hold arbitrary tokens: masked out, they must not matter.
    garbage = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(4, 16))
    tokens, mask = _left_pad(rows, garbage)
    np.testing.assert_array_equal(
        np.asarray(gemma3.left_padded_positions(mask))[1], [0] * 11 + list(range(5)))
    for ids, padded, zero_padded in zip(rows, _logits_padded(params, cfg, rows, garbage),
                                        _logits_padded(params, cfg, rows)):
        alone = _logits_alone(params, cfg, ids)
        # Not bit-identical (different matmul shapes): ~1e-5 on logits of magnitude ~70.
        np.testing.assert_allclose(padded, alone, atol=5e-5, rtol=1e-5)
        np.testing.assert_allclose(zero_padded, alone, atol=5e-5, rtol=1e-5)


def test_bfloat16_compute_tracks_float32(tiny_params):
    """The TPU setting (bf16 weights and compute) stays close to the f32 forward."""
    cfg16 = dataclasses.replace(TINY, dtype="bfloat16", param_dtype="bfloat16")
    params16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), tiny_params[TINY.name])
    ids = _random_ids(np.random.randint(1 << 30), 13, TINY.vocab_size)
    want = _np_log_softmax(_logits_alone(tiny_params[TINY.name], TINY, ids))
    logits16 = _logits_alone(params16, cfg16, ids)
    assert logits16.dtype == np.float32  # logits come out in float32 whatever the compute dtype
    got = _np_log_softmax(logits16)
    # bf16 keeps 8 mantissa bits: per-token log-probs agree to a few percent of their scale.
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
    assert np.mean(got.argmax(-1) == want.argmax(-1)) > 0.7


# ---------------------------------------------------------------------------
# Parity with transformers: tiny random Gemma 3


def _hf_tiny(cfg: ModelConfig, seed: int, explicit_layer_types: bool):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")

    full = {"rope_type": "default", "rope_theta": cfg.rope_base_global}
    if cfg.rope_scale_global != 1.0:
        full = {"rope_type": "linear", "factor": cfg.rope_scale_global,
                "rope_theta": cfg.rope_base_global}
    layer_types = ["full_attention" if cfg.is_global_layer(i) else "sliding_attention"
                   for i in range(cfg.num_layers)]
    pattern = ({"layer_types": layer_types} if explicit_layer_types
               else {"sliding_window_pattern": cfg.global_every})  # the older config key
    hf_cfg = transformers.Gemma3TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.ffw_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        sliding_window=cfg.sliding_window, query_pre_attn_scalar=int(cfg.query_pre_attn_scalar),
        rms_norm_eps=cfg.rms_eps, max_position_embeddings=256,
        rope_parameters={"sliding_attention": {"rope_type": "default",
                                               "rope_theta": cfg.rope_base_local},
                         "full_attention": full},
        attn_implementation="eager", **pattern)
    assert hf_cfg.layer_types == layer_types
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(hf_cfg).to(torch.float32).eval()
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name.endswith("norm.weight"):
                w.normal_(0.0, 0.3)  # HF inits (1 + w) norms at w = 0; make them matter
            elif name.endswith("embed_tokens.weight"):
                w.normal_(0.0, 1.0)
            else:
                w.normal_(0.0, w.shape[1] ** -0.5)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def _hf_log_probs(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([list(ids)])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


@pytest.mark.parametrize("cfg,explicit", [(TINY, True), (TINY_MQA, False)],
                         ids=["tiny", "tiny-mqa-pattern"])
def test_tiny_matches_transformers(tmp_path, cfg, explicit):
    model = _hf_tiny(cfg, seed=0, explicit_layer_types=explicit)
    model.save_pretrained(tmp_path, safe_serialization=True)
    params = weights.load_safetensors(tmp_path, cfg)
    assert weights.load_params(tmp_path, cfg)["embed"].shape == (cfg.vocab_size, cfg.embed_dim)

    rows = [_random_ids(20 + i, n, cfg.vocab_size) for i, n in enumerate((10, 17, 29, 40))]
    hf = [_hf_log_probs(model, ids) for ids in rows]
    worst = 0.0
    for ids, want, padded in zip(rows, hf, _logits_padded(params, cfg, rows)):
        for ours in (_logits_alone(params, cfg, ids), padded):
            diff = np.abs(_np_log_softmax(ours) - want).max(axis=-1)  # per position
            worst = max(worst, float(diff.max()))
            assert diff.max() <= 1e-4, f"len {len(ids)}: worst position {diff.argmax()}"
    print(f"{cfg.name}: max |log-prob diff| vs transformers = {worst:.2e}")


# ---------------------------------------------------------------------------
# Parity with transformers: the embedded Gemma 3 270M on real text

_PROSE = "The river Seine flows through Paris, dividing the city"
_MATH = ("Question: Natalia sold clips to 48 of her friends in April, and then she sold half as "
         "many clips in May. How many clips did Natalia sell altogether in April and May?\n"
         "Answer: In May she sold 48 / 2 = 24 clips. Altogether she sold 48 + 24 = 72 clips.\n"
         "Question: Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes "
         "of babysitting. How much did she earn?\nAnswer:")
_CODE = '''def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    numbers = [0, 1]
    while len(numbers) < n:
        numbers.append(numbers[-1] + numbers[-2])
    return numbers[:n]


if __name__ == "__main__":
    for i, x in enumerate(fibonacci(10)):
        print(f"F({i}) = {x}")
'''
_CHAT = ("<start_of_turn>user\nA robe takes 2 bolts of blue fiber and half that much white "
         "fiber. How many bolts in total does it take? Show your reasoning.<end_of_turn>\n"
         "<start_of_turn>model\n")
_LONG = " ".join([
    "In the early years of the twentieth century, the small harbour town depended almost "
    "entirely on fishing. Every morning before dawn the boats left the quay, and every evening "
    "the women of the town waited on the harbour wall, counting the sails as they came back "
    "around the headland.",
    "When the railway arrived in 1911, everything changed: merchants from the capital bought "
    "the catch directly at the station, prices rose, and for the first time the fishermen could "
    "afford engines for their boats.",
    "The old sailmaker, who had served three generations of captains, closed his workshop a "
    "decade later. His grandson, however, opened a hotel in the same building, because the "
    "railway had also brought something nobody had expected: visitors.",
    "By the 1930s the town had a promenade, two cinemas, a bandstand and a small museum devoted "
    "to the history of the fishing fleet. Photographs from that time show crowded beaches, "
    "striped umbrellas and children queuing for ice cream beside the lifeboat station.",
    "After the war the cinemas closed one after the other, the museum moved into the former "
    "customs house, and the last of the great sailing boats was hauled onto the beach, where it "
    "slowly turned into a playground for the children of the summer visitors.",
    "Yet the harbour never lost its working character entirely. Even today, a handful of boats "
    "still go out before dawn, and the fish market opens at six, long before the first tourists "
    "have finished their breakfast. Local historians argue about whether the railway saved the "
    "town or slowly transformed it into something its founders would not have recognised, but "
    "almost everyone agrees that the harbour wall, where the women once waited, is the best "
    "place to watch the sun go down.",
])


@pytest.fixture(scope="module")
def embedded_prompts(hf_embedded_tokenizer):
    """BOS + ids of real-text prompts, 10 to 300 tokens."""
    ids = [hf_embedded_tokenizer(text).input_ids for text in (_PROSE, _MATH, _CODE, _CHAT, _LONG)]
    ids[-1] = ids[-1][:300]
    assert all(row[0] == 2 for row in ids)  # BOS
    lengths = sorted(len(row) for row in ids)
    assert lengths[0] >= 10 and lengths[-1] == 300, lengths
    assert 105 in ids[3] and 106 in ids[3]  # <start_of_turn>, <end_of_turn> as single tokens
    return ids


@pytest.fixture(scope="module")
def embedded_hf_log_probs(hf_embedded_model, embedded_prompts):
    return [_hf_log_probs(hf_embedded_model, ids).astype(np.float32) for ids in embedded_prompts]


_TOL_270M = 1e-3


def test_embedded_270m_matches_transformers(embedded_params, embedded_prompts,
                                            embedded_hf_log_probs):
    worst = {}
    for ids, want in zip(embedded_prompts, embedded_hf_log_probs):
        ours = np.asarray(_log_softmax(_logits_alone(embedded_params, GEMMA3_270M, ids)))
        diff = np.abs(ours - want).max(axis=-1)  # over the full vocabulary, per position
        worst[len(ids)] = float(diff.max())
        assert diff.max() <= _TOL_270M, f"len {len(ids)}: {diff.max():.2e} at {diff.argmax()}"
        np.testing.assert_array_equal(ours.argmax(-1), want.argmax(-1))
    print("270M max |log-prob diff| vs transformers by prompt length:",
          {k: f"{v:.2e}" for k, v in sorted(worst.items())})


def test_embedded_270m_batched_matches_transformers(embedded_params, embedded_prompts,
                                                    embedded_hf_log_probs):
    """All prompts in one left-padded batch: each row's real positions match transformers."""
    tokens, mask = _left_pad(embedded_prompts)
    hidden = _hidden(embedded_params, tokens, gemma3.left_padded_positions(mask), mask,
                     GEMMA3_270M)
    log_probs = jax.jit(lambda p, h: jax.nn.log_softmax(
        gemma3.logits_from_hidden(p, h, GEMMA3_270M), axis=-1))
    worst = 0.0
    for row, (ids, want) in enumerate(zip(embedded_prompts, embedded_hf_log_probs)):
        ours = np.asarray(log_probs(embedded_params, hidden[row, tokens.shape[1] - len(ids):]))
        diff = np.abs(ours - want).max(axis=-1)
        worst = max(worst, float(diff.max()))
        assert diff.max() <= _TOL_270M, f"row {row} (len {len(ids)}): {diff.max():.2e}"
    print(f"270M batched max |log-prob diff| vs transformers: {worst:.2e}")
