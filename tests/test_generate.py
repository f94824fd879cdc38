"""Sampling and the `generate` CLI: greedy parity with transformers, log-probs
against the full forward, and one-line errors for bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import generate
from grpo_jax.config import GEMMA3_270M, TINY
from grpo_jax.model import gemma3
from grpo_jax.sampler import left_pad, sample_uncached
from grpo_jax.tokenizer import STOP_IDS, chat_prompt

PROMPTS = [
    "The capital of France is",
    chat_prompt("Natalia sold clips to 48 of her friends in April, and then she sold half as "
                "many clips in May. How many clips did Natalia sell altogether?"),
    "def fibonacci(n):\n",
]


def _full_logprobs(params, cfg, ids):
    """Log-softmax at every position of one unpadded sequence, from the full forward."""
    tokens = jnp.asarray([ids], jnp.int32)
    mask = jnp.ones_like(tokens, bool)
    logits = jax.jit(gemma3.forward, static_argnums=4)(
        params, tokens, gemma3.left_padded_positions(mask), mask, cfg)
    return np.asarray(jax.nn.log_softmax(logits[0], axis=-1))


@pytest.fixture(scope="module")
def greedy_embedded(embedded_params, embedded_tokenizer):
    encoded = [embedded_tokenizer.encode(p, add_bos=True) for p in PROMPTS]
    tokens, mask = left_pad(encoded)
    out = sample_uncached(embedded_params, tokens, mask, jax.random.key(0), cfg=GEMMA3_270M,
                          max_new_tokens=32, temperature=0.0)
    return encoded, out


def test_greedy_matches_transformers_generate(greedy_embedded, hf_embedded_model):
    import torch

    encoded, out = greedy_embedded
    for row, ids in enumerate(encoded):
        n = int(out.lengths[row])
        ours = np.asarray(out.tokens[row, :n]).tolist()
        with torch.no_grad():
            hf = hf_embedded_model.generate(
                torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                eos_token_id=list(STOP_IDS), pad_token_id=0)[0, len(ids):].tolist()
        assert ours == hf[:n], f"prompt {row}: ours {ours} vs transformers {hf}"
        if n < 32:
            assert ours[-1] in STOP_IDS and bool(out.stopped[row])


def test_sampled_logprobs_equal_full_forward(greedy_embedded, embedded_params):
    encoded, out = greedy_embedded
    for row, ids in enumerate(encoded):
        n = int(out.lengths[row])
        completion = np.asarray(out.tokens[row, :n]).tolist()
        full = _full_logprobs(embedded_params, GEMMA3_270M, ids + completion)
        expected = full[len(ids) - 1:len(ids) - 1 + n][np.arange(n), completion]
        np.testing.assert_allclose(np.asarray(out.logprobs[row, :n]), expected, atol=2e-4)
        # Greedy: every chosen token is the full forward's argmax.
        assert completion == full[len(ids) - 1:len(ids) - 1 + n].argmax(-1).tolist()


def test_uncached_greedy_is_stepwise_argmax_and_padding_invariant():
    """Tiny random model, prompts of different lengths across the sliding window."""
    params = gemma3.init_params(TINY, jax.random.key(np.random.randint(1 << 30)))
    rng = np.random.default_rng()
    prompts = [rng.integers(3, TINY.vocab_size, size=n).tolist() for n in (3, 9, 17)]
    tokens, mask = left_pad(prompts)
    out = sample_uncached(params, tokens, mask, jax.random.key(0), cfg=TINY,
                          max_new_tokens=12, temperature=0.0, stop_ids=(-1,))
    assert np.all(np.asarray(out.lengths) == 12) and not np.any(np.asarray(out.stopped))
    for row, ids in enumerate(prompts):
        seq = list(ids)
        for _ in range(12):
            seq.append(int(_full_logprobs(params, TINY, seq)[-1].argmax()))
        assert np.asarray(out.tokens[row]).tolist() == seq[len(ids):]
        alone_t, alone_m = left_pad([ids])
        alone = sample_uncached(params, alone_t, alone_m, jax.random.key(0), cfg=TINY,
                                max_new_tokens=12, temperature=0.0, stop_ids=(-1,))
        np.testing.assert_array_equal(alone.tokens[0], out.tokens[row])
        np.testing.assert_allclose(alone.logprobs[0], out.logprobs[row], atol=1e-5)


def test_stop_token_ends_row_and_pads_after():
    params = gemma3.init_params(TINY, jax.random.key(1))
    tokens, mask = left_pad([[2, 7, 8], [2, 9]])
    free = sample_uncached(params, tokens, mask, jax.random.key(0), cfg=TINY,
                           max_new_tokens=8, temperature=0.0, stop_ids=(-1,))
    stop = int(free.tokens[0, 2])  # make row 0's third token a stop token
    out = sample_uncached(params, tokens, mask, jax.random.key(0), cfg=TINY,
                          max_new_tokens=8, temperature=0.0, stop_ids=(stop,))
    first = np.asarray(out.tokens[0]).tolist()
    n = first.index(stop) + 1
    assert n <= 3 and int(out.lengths[0]) == n and bool(out.stopped[0])
    assert all(t == 0 for t in first[n:]) and np.all(np.asarray(out.logprobs[0, n:]) == 0)


def test_temperature_sampling_is_reproducible_per_seed():
    params = gemma3.init_params(TINY, jax.random.key(2))
    # A small embedding flattens the (tied) logits, so sampling has real choices to make.
    params = {**params, "embed": params["embed"] * 0.05}
    tokens, mask = left_pad([[2, 5, 6, 7]] * 4)
    a = sample_uncached(params, tokens, mask, jax.random.key(3), cfg=TINY,
                        max_new_tokens=10, temperature=1.0, stop_ids=(-1,))
    b = sample_uncached(params, tokens, mask, jax.random.key(3), cfg=TINY,
                        max_new_tokens=10, temperature=1.0, stop_ids=(-1,))
    c = sample_uncached(params, tokens, mask, jax.random.key(4), cfg=TINY,
                        max_new_tokens=10, temperature=1.0, stop_ids=(-1,))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_cli_json_output(tmp_path, capsys, greedy_embedded):
    encoded, out = greedy_embedded
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS[:2]) + "\n")
    code = generate.main(["--model", "gemma3-270m", "--prompts-file", str(prompts),
                          "--max-new-tokens", "32", "--temperature", "0", "--json"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2
    for row, r in enumerate(rows):
        n = int(out.lengths[row])
        assert r["prompt_ids"] == encoded[row]
        assert r["completion_ids"] == np.asarray(out.tokens[row, :n]).tolist()
        np.testing.assert_allclose(r["logprobs"], np.asarray(out.logprobs[row, :n]), atol=1e-5)
        assert isinstance(r["completion"], str)


def _cli_error(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "grpo_jax.generate", *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_cli_unknown_model():
    assert "unknown model 'gemma9-1t'" in _cli_error(["--model", "gemma9-1t", "--prompt", "hi"])


def test_cli_missing_prompts_file(tmp_path):
    msg = _cli_error(["--prompts-file", str(tmp_path / "nope.jsonl")])
    assert "prompts file not found" in msg and "nope.jsonl" in msg


@pytest.mark.parametrize("bad, why", [
    ('{"prompt": "ok"', "not valid JSON"),
    ('{"text": "no prompt key"}', '"prompt" string'),
    ('["prompt"]', '"prompt" string'),
    ('{"prompt": 42}', '"prompt" string'),
])
def test_cli_malformed_prompt_line(tmp_path, bad, why):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n\n' + bad + "\n")
    msg = _cli_error(["--prompts-file", str(path)])
    assert f"{path}:3:" in msg and why in msg


def test_cli_checkpoint_shape_mismatch(tmp_path):
    from safetensors.numpy import save_file

    params = gemma3.init_params(TINY, jax.random.key(0))
    save_file({"model.embed_tokens.weight": np.asarray(params["embed"])},
              str(tmp_path / "model.safetensors"))
    msg = _cli_error(["--model", "gemma3-270m", "--checkpoint", str(tmp_path), "--prompt", "hi"])
    assert "embed" in msg and str(tuple(params["embed"].shape)) in msg and "(262144, 640)" in msg


def test_cli_missing_checkpoint(tmp_path):
    msg = _cli_error(["--model", "gemma3-1b", "--checkpoint", str(tmp_path / "none"), "--prompt", "x"])
    assert "not found" in msg


def test_cli_preset_without_embedded_weights():
    assert "no embedded weights" in _cli_error(["--model", "gemma3-1b", "--prompt", "x"])


def test_cli_bad_numbers():
    assert "--max-new-tokens" in _cli_error(["--prompt", "x", "--max-new-tokens", "0"])
    assert "--temperature" in _cli_error(["--prompt", "x", "--temperature", "-1"])
