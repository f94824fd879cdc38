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
from grpo_jax.config import SamplerConfig
from grpo_jax.model.config import GEMMA3_270M, TINY
from grpo_jax.model import gemma3
from grpo_jax.sampler import sample_prompts
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
    """The KV-cached sampler, greedy, 32 tokens, on the embedded weights."""
    encoded = [embedded_tokenizer.encode(p, add_bos=True) for p in PROMPTS]
    out = sample_prompts(embedded_params, encoded, jax.random.key(0), cfg=GEMMA3_270M,
                         sampling=SamplerConfig(max_new_tokens=32, temperature=0.0,
                                                stop_ids=STOP_IDS))
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
    assert "--top-p must be in (0, 1]" in _cli_error(["--prompt", "x", "--top-p", "1.5"])
