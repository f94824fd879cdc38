"""End to end on the `tiny` preset: steps run, metrics and checkpoints are written,
a second invocation resumes at the right step and matches an uninterrupted run;
bad input fails with one line and overwrites nothing."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from grpo_jax import train
from grpo_jax.config import TRAIN_PRESETS, GRPOConfig

TINY = dataclasses.replace(TRAIN_PRESETS["tiny"], tensorboard=False, eval_problems=0)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_writes_metrics_and_checkpoints_then_resumes(tmp_path):
    run = tmp_path / "run"
    cfg = dataclasses.replace(TINY, output_dir=str(run), steps=3, save_every=2)
    train.train(cfg)
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward/mean", "reward/match_format_exactly", "reward/check_answer",
                "format_rate", "accuracy", "kl", "loss", "clip_frac", "completion_len/mean",
                "tokens_per_s", "step_time_s", "skipped", "logprob_drift", "time/sample_s",
                "time/update_s"):
        assert key in rows[0], key
    # The sampler's log-probs and the trainer's agree (float32, same weights).
    assert all(r["logprob_drift"] < 1e-4 for r in rows), [r["logprob_drift"] for r in rows]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "3"]
    assert (run / "samples.jsonl").read_text().strip()

    # Same directory, more steps: resumes after step 3.
    train.train(dataclasses.replace(cfg, steps=5))
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4, 5]


def test_resumed_run_equals_uninterrupted(tmp_path):
    full = dataclasses.replace(TINY, output_dir=str(tmp_path / "full"), steps=4, save_every=2)
    train.train(full)
    half = dataclasses.replace(full, output_dir=str(tmp_path / "half"))
    train.train(dataclasses.replace(half, steps=2))
    train.train(half)
    a, b = _rows(tmp_path / "full"), _rows(tmp_path / "half")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("reward/mean", "loss", "kl", "completion_len/mean", "format_rate"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-5), (ra["step"], key)


def _cli(args, cwd):
    proc = subprocess.run([sys.executable, "-m", "grpo_jax.train", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    lines = proc.stderr.strip().splitlines()
    return proc.returncode, (lines[-1] if lines else "")


def test_bad_input_one_line_each(tmp_path):
    code, msg = _cli(["--preset", "nope"], tmp_path)
    assert code == 2 and msg == "error: unknown preset 'nope'; choose one of: cpu-270m, tiny, v5e-8-gemma3-1b"
    code, msg = _cli(["--preset", "tiny", "--output-dir", str(tmp_path / "r"),
                      "--data.dataset", str(tmp_path / "missing.jsonl")], tmp_path)
    assert code == 2 and "dataset file not found" in msg and "missing.jsonl" in msg
    code, msg = _cli(["--preset", "tiny", "--grpo.micro-batch", "3"], tmp_path)
    assert code == 2 and "does not divide the batch of 8" in msg


def test_output_dir_of_a_different_model_is_refused(tmp_path):
    run = tmp_path / "run"
    train.train(dataclasses.replace(TINY, output_dir=str(run), steps=1, save_every=1))
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    other = dataclasses.replace(TINY, output_dir=str(run), steps=2,
                                lora=dataclasses.replace(TINY.lora, rank=8))
    with pytest.raises(ValueError, match="different run .*differs in: lora"):
        train.train(other)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert [r["step"] for r in _rows(run)] == [1]


def test_group_size_must_allow_advantages():
    with pytest.raises(ValueError, match="group_size must be at least 2"):
        GRPOConfig(group_size=1)


def test_rewards_are_configurable_from_the_train_config(tmp_path):
    """A plugged-in reward named in the config is the one that is logged."""
    from grpo_jax import rewards
    from grpo_jax.rewards import RewardConfig

    rewards.register_reward("short_text", lambda c, a: [-len(x) / 16.0 for x in c])
    cfg = dataclasses.replace(TINY, output_dir=str(tmp_path / "run"), steps=1,
                              rewards=RewardConfig(functions=(("short_text", 2.0),)))
    train.train(cfg)
    row = _rows(tmp_path / "run")[0]
    assert "reward/short_text" in row and "reward/check_answer" not in row
    assert row["reward/mean"] == pytest.approx(2.0 * row["reward/short_text"])


def test_logprob_drift_metric_measures_sampler_trainer_gap():
    """train_step's drift is the masked mean |trainer - sampler| log-prob: a known
    offset on real tokens reads back exactly; padding is ignored."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from grpo_jax.model import lora as lora_lib

    cfg = TINY
    model_cfg, params, _ = train.load_base(cfg)
    lora = lora_lib.init_lora(model_cfg, cfg.lora, jax.random.key(0))
    opt_state = train.make_optimizer(cfg.optimizer, 4).init(lora)
    rng = np.random.default_rng(0)
    n, prompt_len, t = 8, 6, 5
    tokens = jnp.asarray(rng.integers(3, 200, (n, prompt_len + t)), jnp.int32)
    mask = np.ones((n, prompt_len + t), bool)
    mask[:, prompt_len + 3:] = False  # 3 real completion tokens per row
    mask = jnp.asarray(mask)
    true = train.sequence_logprobs(params, lora, tokens, mask, prompt_len=prompt_len,
                                   model_cfg=model_cfg, chunk=16)
    offset = jnp.where(mask[:, prompt_len:], 0.25, 100.0)  # padding: large, must not count
    kw = dict(prompt_len=prompt_len, model_cfg=model_cfg, grpo_cfg=cfg.grpo,
              opt_cfg=cfg.optimizer, total_updates=4)
    adv = jnp.zeros((n,), jnp.float32)
    *_, m = train.train_step(params, lora, opt_state, tokens, mask, None, true, adv,
                             true + offset, **kw)
    assert float(m["logprob_drift"]) == pytest.approx(0.25, abs=1e-5)


def test_periodic_evaluation_goes_into_the_metrics_rows(tmp_path):
    run = tmp_path / "run"
    cfg = dataclasses.replace(TINY, output_dir=str(run), steps=4, save_every=4, eval_every=2,
                              eval_problems=3)
    train.train(cfg)
    rows = _rows(run)
    for key in ("eval/format_accuracy", "eval/exact_accuracy", "eval/partial_accuracy",
                "eval/lenient_accuracy"):
        assert 0.0 <= rows[1][key] <= 1.0, key
    # Steps between evaluations, and the last one (whose evaluation is eval.json), have none.
    assert not any(k.startswith("eval/") for r in (rows[0], rows[2], rows[3]) for k in r)
    assert json.loads((run / "eval.json").read_text())["num_problems"] == 3


def test_the_trained_policy_is_the_sampling_temperature(tmp_path):
    """At temperature 0.7 the trainer's log-probs are those of logits / 0.7: they agree
    with what the sampler drew from (untempered log-probs would differ by ~0.1+)."""
    cfg = dataclasses.replace(TINY, output_dir=str(tmp_path / "run"), steps=1,
                              sampler=dataclasses.replace(TINY.sampler, temperature=0.7))
    train.train(cfg)
    assert _rows(tmp_path / "run")[0]["logprob_drift"] < 1e-4
    with pytest.raises(ValueError, match="temperature must be > 0 for training"):
        dataclasses.replace(cfg, sampler=dataclasses.replace(TINY.sampler, temperature=0.0))
