"""End to end on the `tiny` preset: steps run, metrics and checkpoints are written,
a second invocation resumes at the right step and matches an uninterrupted run;
bad input fails with one line and overwrites nothing."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types

import numpy as np
import pytest

from _compare import assert_same_gradient
from grpo_jax import data, rollout, runs, train, update as step_lib
from grpo_jax.config import GRPOConfig
from grpo_jax.presets import TRAIN_PRESETS

TINY = dataclasses.replace(TRAIN_PRESETS["tiny"], tensorboard=False, eval_problems=0)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class Interrupted(Exception):
    pass


def _interrupt_before(monkeypatch, step: int):
    """Make rollout.grpo_step raise before running `step`: a run stopped there."""
    real = rollout.grpo_step

    def grpo_step(ctx, params, state, at, position):
        if at == step:
            raise Interrupted(f"stopped before step {step}")
        return real(ctx, params, state, at, position)

    monkeypatch.setattr(rollout, "grpo_step", grpo_step)


def test_tiny_run_writes_metrics_and_checkpoints_then_resumes(tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = dataclasses.replace(TINY, output_dir=str(run), steps=5, save_every=2)
    _interrupt_before(monkeypatch, 4)
    with pytest.raises(Interrupted):
        train.train(cfg)
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward/mean", "reward/match_format_exactly", "reward/check_answer",
                "format_rate", "accuracy", "kl", "loss", "clip_frac", "completion_len/mean",
                "tokens_per_s", "step_time_s", "skipped", "logprob_drift", "time/sample_s",
                "time/update_s"):
        assert key in rows[0], key
    # Without dynamic sampling a step uses up num_prompts problems, one round.
    assert [r["data_position"] for r in rows] == [cfg.data_position(s) for s in (1, 2, 3)]
    assert all(r["dynamic/rounds"] == 1 and r["dynamic/dropped_groups"] == 0 for r in rows)
    # Programs compile (or are read back from the suite's cache) in the first step only:
    # fixed shapes, so nothing recompiles after it.
    assert rows[0]["compiles"] + rows[0]["compile_cache_hits"] > 0 and rows[0]["compile_s"] > 0
    assert all(r["compiles"] == r["compile_cache_hits"] == 0 for r in rows[1:]), rows
    # The sampler's log-probs and the trainer's agree (float32, same weights).
    assert all(r["logprob_drift"] < 1e-4 for r in rows), [r["logprob_drift"] for r in rows]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2"]
    assert (run / "samples.jsonl").read_text().strip()
    # config.json records where the problems came from (and reads back as the config).
    recorded = json.loads((run / "config.json").read_text())["data_source"]
    assert recorded == data.source_versions(cfg.data) and recorded["reasoning-gym"]
    assert runs.run_config(run) == cfg

    # Same directory, same config: resumes after the checkpoint of step 2, redoing step 3.
    monkeypatch.undo()
    train.train(cfg)
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4", "5"]


def stopped_then_resumed(cfg, monkeypatch, step: int, repatch=lambda: None) -> None:
    """Train `cfg` stopped before `step`, then again to the end in the same directory
    (`repatch` restores the test's other patches after the stop's are undone)."""
    _interrupt_before(monkeypatch, step)
    with pytest.raises(Interrupted):
        train.train(cfg)
    monkeypatch.undo()
    repatch()
    train.train(cfg)


def test_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
    full = dataclasses.replace(TINY, output_dir=str(tmp_path / "full"), steps=4, save_every=2)
    train.train(full)
    half = dataclasses.replace(full, output_dir=str(tmp_path / "half"))
    stopped_then_resumed(half, monkeypatch, 3)
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
    assert code == 2 and msg == "error: unknown preset 'nope'; choose one of: cpu-270m, cpu-270m-long, cpu-270m-calc, tiny, v5e-8-gemma3-1b"
    code, msg = _cli(["--preset", "tiny", "--output-dir", str(tmp_path / "r"),
                      "--data.dataset", str(tmp_path / "missing.jsonl")], tmp_path)
    assert code == 2 and "dataset file not found" in msg and "missing.jsonl" in msg
    code, msg = _cli(["--preset", "tiny", "--grpo.micro-batch", "3"], tmp_path)
    assert code == 2 and "does not divide the batch of 8" in msg
    # A local training file without held-out problems: refused before any step runs.
    local = tmp_path / "train.jsonl"
    local.write_text(json.dumps({"question": "What is 1 plus 1?", "answer": "#### 2"}) + "\n")
    code, msg = _cli(["--preset", "tiny", "--output-dir", str(tmp_path / "r2"),
                      "--data.dataset", str(local)], tmp_path)
    assert code == 2 and "needs --data.eval-dataset FILE" in msg
    assert not (tmp_path / "r2").exists()


def _snapshot(directory):
    """Every file under `directory` with its bytes and modification time."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step tiny run, checkpointed at both steps, and its config."""
    run = tmp_path_factory.mktemp("finished") / "run"
    cfg = dataclasses.replace(TINY, output_dir=str(run), steps=2, save_every=1)
    train.train(cfg)
    return run, cfg


@pytest.mark.parametrize("change, named", [
    (dict(grpo=dataclasses.replace(TINY.grpo, num_prompts=4)), "grpo.num_prompts (2 -> 4)"),
    (dict(grpo=dataclasses.replace(TINY.grpo, group_size=2)), "grpo.group_size (4 -> 2)"),
    (dict(data=dataclasses.replace(TINY.data, shuffle_seed=5)), "data.shuffle_seed (0 -> 5)"),
    (dict(data=dataclasses.replace(TINY.data, train_seed=7)), "data.train_seed (1 -> 7)"),
    (dict(steps=4), "steps (2 -> 4)"),
    (dict(optimizer=dataclasses.replace(TINY.optimizer, learning_rate=1e-3)),
     "optimizer.learning_rate (0.0001 -> 0.001)"),
    (dict(sampler=dataclasses.replace(TINY.sampler, temperature=0.7)),
     "sampler.temperature (1.0 -> 0.7)"),
    (dict(seed=3), "seed (0 -> 3)"),
    (dict(lora=dataclasses.replace(TINY.lora, rank=8)), "lora.rank (4 -> 8)"),
])
def test_resume_refuses_a_changed_run_and_touches_nothing(finished_run, change, named):
    run, cfg = finished_run
    before = _snapshot(run)
    with pytest.raises(ValueError, match="holds a run with other settings") as err:
        train.train(dataclasses.replace(cfg, **change))
    assert named in str(err.value) and "\n" not in str(err.value)
    assert _snapshot(run) == before


def test_resume_may_change_what_a_step_does_not_compute(finished_run):
    """Logging, evaluation, checkpointing and memory knobs may change on a resume;
    config.json keeps the run's original values."""
    run, cfg = finished_run
    original = (run / "config.json").read_bytes()
    train.train(dataclasses.replace(
        cfg, log_samples=0, save_every=2, keep_checkpoints=5, eval_problems=2,
        grpo=dataclasses.replace(cfg.grpo, micro_batch=4, logprob_chunk=32,
                                 share_prompt=False)))
    assert (run / "config.json").read_bytes() == original
    assert json.loads((run / "eval.json").read_text())["step"] == 2


def test_resume_checks_the_saved_data_position(tmp_path):
    """A config.json edited to another batch size passes the config check; the
    checkpoint's data position still refuses it."""
    run = tmp_path / "run"
    cfg = dataclasses.replace(TINY, output_dir=str(run), steps=2, save_every=1)
    train.train(cfg)
    edited = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, num_prompts=1))
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(edited)))
    with pytest.raises(ValueError, match="saved at data position 4, but this config puts "
                                         "step 2 at 2"):
        train.train(edited)


def test_output_dir_of_a_different_model_is_refused(tmp_path):
    """Without config.json (a run written before it, or deleted), the checkpoints'
    fingerprint still refuses another model or LoRA shape."""
    run = tmp_path / "run"
    train.train(dataclasses.replace(TINY, output_dir=str(run), steps=1, save_every=1))
    (run / "config.json").unlink()
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


def _fns(grpo_cfg=None, total_updates=4):
    cfg = TINY
    model_cfg = runs.load_run_base(cfg).cfg
    return step_lib.build_update(model_cfg, grpo_cfg or cfg.grpo, cfg.optimizer, total_updates)


def test_logprob_drift_metric_measures_sampler_trainer_gap():
    """update's drift is the masked mean |trainer - sampler| log-prob: a known
    offset on real tokens reads back exactly; padding is ignored."""
    import jax
    import jax.numpy as jnp

    from grpo_jax.model import lora as lora_lib

    cfg = TINY
    model_cfg, params, _ = runs.load_run_base(cfg)
    fns = _fns()
    lora = lora_lib.init_lora(model_cfg, cfg.lora, jax.random.key(0))
    rng = np.random.default_rng(0)
    n, prompt_len, t = 8, 6, 5
    tokens = rng.integers(3, 200, (n, prompt_len + t))
    # GRPO's layout: the rows of a group share their prompt (the update packs it once).
    tokens[:, :prompt_len] = np.repeat(tokens[::cfg.grpo.group_size, :prompt_len],
                                       cfg.grpo.group_size, axis=0)
    mask = np.ones((n, prompt_len + t), bool)
    mask[:, prompt_len + 3:] = False  # 3 real completion tokens per row
    batch = step_lib.Batch(tokens=jnp.asarray(tokens, jnp.int32), input_mask=jnp.asarray(mask),
                           advantages=jnp.zeros((n,), jnp.float32), prompt_len=prompt_len)
    true = fns.batch_logprobs(params, lora, batch)
    offset = jnp.where(batch.completion_mask, 0.25, 100.0)  # padding: large, must not count
    batch = batch.replace(ref_logprobs=true, sample_logprobs=true + offset)
    _, m = fns.update(params, fns.init_state(lora), batch)
    assert float(m["logprob_drift"]) == pytest.approx(0.25, abs=1e-5)


def _update_batch(seed=3, prompt_len=8, t=6):
    """A tiny-model batch in GRPO's layout (each group's rows share a left-padded
    prompt; completions of 1..t tokens), a perturbed LoRA, and an `update(**grpo)`
    that runs the update on it with old and reference log-probs given."""
    import jax
    import jax.numpy as jnp

    from grpo_jax.model import lora as lora_lib

    cfg = TINY
    model_cfg, params, _ = runs.load_run_base(cfg)
    lora = lora_lib.init_lora(model_cfg, cfg.lora, jax.random.key(1))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), lora)
    rng = np.random.default_rng(seed)
    g, n = cfg.grpo.group_size, cfg.grpo.batch_size
    prompts = rng.integers(3, 200, (n // g, prompt_len))
    tokens = jnp.asarray(np.concatenate([np.repeat(prompts, g, axis=0),
                                         rng.integers(3, 200, (n, t))], axis=1), jnp.int32)
    p_lens = np.repeat(rng.integers(1, prompt_len + 1, n // g), g)
    c_lens = rng.integers(1, t + 1, n)
    idx = np.arange(prompt_len + t)
    mask = jnp.asarray((idx >= prompt_len - p_lens[:, None])
                       & (idx < prompt_len + c_lens[:, None]))
    adv = jnp.asarray(rng.standard_normal(n), jnp.float32)
    batch = step_lib.Batch(tokens=tokens, input_mask=mask, advantages=adv, prompt_len=prompt_len)
    ref = _fns(dataclasses.replace(cfg.grpo, share_prompt=False)).batch_logprobs(params, None, batch)
    # Old log-probs off the current policy, so ratios move and some clip.
    old = ref + jnp.asarray(0.3 * rng.standard_normal(ref.shape), jnp.float32)
    batch = batch.replace(ref_logprobs=ref, old_logprobs=old, sample_logprobs=ref)

    def update(**grpo_kw):
        fns = _fns(dataclasses.replace(cfg.grpo, num_iterations=2, **grpo_kw))
        state, metrics = fns.update(params, fns.init_state(jax.tree.map(jnp.copy, lora)), batch)
        return state.lora, state.opt_state, metrics

    return params, model_cfg, batch, update


def _assert_same_update(got, want, keys):
    """(lora, opt_state, metrics) of two first updates from the same state: the same
    gradient (Adam's moments; see _compare) and the same metrics."""
    assert_same_gradient(got[1], want[1], got[2]["grad_norm"], want[2]["grad_norm"])
    for key in keys:
        np.testing.assert_allclose(got[2][key], want[2][key], rtol=1e-4, atol=1e-6,
                                   err_msg=key)
    assert float(want[2]["grad_norm"]) > 0


def test_update_with_shared_prompts_equals_one_row_per_completion():
    """train_step packs each group's prompt once (whole batch, and micro-batches of
    one group); the updated LoRA, optimizer state and metrics equal the unpacked
    update's, as do the reference log-probs."""

    params, model_cfg, batch, update = _update_batch()
    packed_ref = _fns().batch_logprobs(params, None, batch)
    cmask = np.asarray(batch.completion_mask)
    np.testing.assert_allclose(np.asarray(packed_ref)[cmask],
                               np.asarray(batch.ref_logprobs)[cmask], atol=2e-5)
    g = TINY.grpo.group_size
    keys = ("loss", "kl_mean", "grad_norm", "clip_frac", "logprob_drift")
    _assert_same_update(update(), update(share_prompt=False), keys)
    _assert_same_update(update(micro_batch=g), update(micro_batch=g, share_prompt=False), keys)


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean",
                                         "seq-mean-token-sum-norm"])
def test_micro_batches_add_up_to_the_whole_batch(aggregation):
    """Micro-batches holding unequal token counts: the loss, update and every metric
    equal the whole batch's (token means weighted by tokens, extremes as extremes)."""
    *_, update = _update_batch(seed=4)
    whole = update(aggregation=aggregation)
    micro = update(aggregation=aggregation, micro_batch=TINY.grpo.group_size)
    _assert_same_update(micro, whole, sorted(whole[2]))
    assert 0 < float(whole[2]["clip_frac"]) < 1
    assert float(whole[2]["ratio_min"]) < 1 < float(whole[2]["ratio_max"])


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
    result = json.loads((run / "eval.json").read_text())
    assert result["num_problems"] == 3
    assert result["data_source"] == data.source_versions(cfg.data)  # what the problems came from


def test_the_trained_policy_is_the_sampling_temperature(tmp_path):
    """At temperature 0.7 the trainer's log-probs are those of logits / 0.7: they agree
    with what the sampler drew from (untempered log-probs would differ by ~0.1+)."""
    cfg = dataclasses.replace(TINY, output_dir=str(tmp_path / "run"), steps=1,
                              sampler=dataclasses.replace(TINY.sampler, temperature=0.7))
    train.train(cfg)
    assert _rows(tmp_path / "run")[0]["logprob_drift"] < 1e-4
    with pytest.raises(ValueError, match="temperature must be > 0 for training"):
        dataclasses.replace(cfg, sampler=dataclasses.replace(TINY.sampler, temperature=0.0))


def test_train_step_benchmark_reports_and_rejects_bad_input():
    import pathlib

    script = pathlib.Path(__file__).parent.parent / "benchmarks" / "train_step.py"
    proc = subprocess.run([sys.executable, str(script), "--model", "tiny", "--prompt-len", "8",
                           "--completion-len", "8", "--repeats", "1", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["share_prompt"] and result["update_s"] > 0 and result["reference_s"] > 0
    assert result["memory"]["update_temp_gb"] > 0
    assert min(result["machine"]["matmul_gflops"].values()) > 0
    assert result["dtype"] in ("float32", "bfloat16")  # --dtype auto, resolved
    for args, message in [(["--repeats", "0"], "must be positive"),
                          (["--micro-batch", "3"], "does not divide the batch of 8")]:
        proc = subprocess.run([sys.executable, str(script), "--model", "tiny", *args],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("script, args, message", [
    ("trl_step_reference.py", ["--dtype", "float16"], "choose float32 or bfloat16"),
    ("trl_step_reference.py", ["--group", "1"], "at least 2 completions per prompt"),
    ("hf_generate_reference.py", ["--dtype", "bf16"], "choose float32 or bfloat16"),
])
def test_reference_benchmarks_reject_bad_input(script, args, message):
    """The field's reference figures (transformers, TRL) refuse a bad option in one
    line before loading anything."""
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "benchmarks" / script
    proc = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and message in proc.stderr


def test_lora_init_and_sampling_draw_from_separate_streams():
    """No LoRA leaf's init key is a step's sampling key. One key for both (the
    earlier scheme) collides: split(key, n)[i] == fold_in(key, i) in JAX's
    threefry, so step i sampled with leaf i's init key."""
    import jax

    def data(keys):
        return {tuple(np.asarray(jax.random.key_data(k)).tolist()) for k in keys}

    n = 200
    lora_key, sampling_key = train.run_keys(0)
    init_keys = data(jax.random.split(lora_key, n))
    step_keys = data(jax.random.fold_in(sampling_key, s) for s in range(n))
    assert len(init_keys) == len(step_keys) == n and not init_keys & step_keys
    shared = jax.random.key(0)
    assert data(jax.random.split(shared, n)) == data(jax.random.fold_in(shared, s)
                                                     for s in range(n))


def test_k1_is_a_penalty_on_the_reward(tmp_path):
    """kl_estimator k1 puts beta * (sampler - reference log-prob), summed over each
    completion, into the reward before advantages: logged as reward/kl_penalty."""

    from grpo_jax import grpo

    cfg = dataclasses.replace(TINY, output_dir=str(tmp_path / "run"), steps=2, save_every=2,
                              grpo=dataclasses.replace(TINY.grpo, kl_estimator="k1", beta=0.5))
    train.train(cfg)
    rows = _rows(tmp_path / "run")
    assert all("reward/kl_penalty" in r for r in rows)
    # Step 1 samples the reference itself (LoRA's B = 0): the penalty is ~0 there,
    # and non-zero once the policy has moved.
    assert abs(rows[0]["reward/kl_penalty"]) < 1e-4 and rows[1]["reward/kl_penalty"] != 0
    # What completion_advantages feeds group_advantages.
    batch = step_lib.Batch(tokens=np.zeros((8, 3), np.int32), input_mask=np.ones((8, 3), bool),
                           prompt_len=1, sample_logprobs=np.full((8, 2), -1.0, np.float32),
                           ref_logprobs=np.tile(np.array([[-1.0], [-3.0]], np.float32), (4, 2)))
    total = np.arange(8, dtype=np.float64)
    assert rollout.penalty_in_reward(cfg)
    penalty = rollout.kl_penalties(cfg, batch)
    advantages = rollout.completion_advantages(cfg, total, penalty)
    assert isinstance(advantages, np.ndarray)  # the host side stays NumPy
    np.testing.assert_allclose(penalty, np.tile([0.0, 2.0], 4), atol=1e-6)  # 0.5 * 2 * 2
    np.testing.assert_allclose(advantages, grpo.group_advantages(
        (total - penalty).astype(np.float32), 4), atol=1e-6)


def test_rewards_and_evaluation_see_the_prefill(tmp_path):
    """With a prefill the prompt ends with it, and what the rewards and the evaluation
    score is prefill + completion."""
    from grpo_jax import rewards
    from grpo_jax.rewards import RewardConfig

    seen: list[str] = []

    def opens_with_prefill(completions, answers):
        seen.extend(completions)
        return [float(c.startswith("<reasoning>")) for c in completions]

    rewards.register_reward("opens_with_prefill", opens_with_prefill)
    run = tmp_path / "run"
    cfg = dataclasses.replace(
        TINY, output_dir=str(run), steps=1, eval_problems=2,
        data=dataclasses.replace(TINY.data, prompt_style="plain", prefill="<reasoning>"),
        rewards=RewardConfig(functions=(("opens_with_prefill", 1.0),)))
    train.train(cfg)
    assert len(seen) == cfg.grpo.batch_size
    assert _rows(run)[0]["reward/opens_with_prefill"] == 1.0
    records = json.loads((run / "eval.json").read_text())["records"]
    assert all(r["completion"].startswith("<reasoning>") for r in records["trained"])


def test_zero_variance_groups_metric():
    """The fraction of groups whose G rewards are all equal (no advantage, no signal)."""
    total = np.asarray([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, -2.0, -2.0, -2.0, -2.0])
    sampled = types.SimpleNamespace(lengths=np.full(12, 5), stopped=np.ones(12, bool))
    update = {"loss": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "logprob_drift": 0.0,
              "finite": True}
    texts, answers = [""] * 12, ["1"] * 12
    m = rollout.step_metrics(total, {}, texts, answers, sampled, [update], None, elapsed=1.0,
                             group=4)
    assert m["zero_variance_groups"] == pytest.approx(2 / 3)
    m = rollout.step_metrics(total, {}, texts, answers, sampled, [update], None, elapsed=1.0,
                             group=2)
    assert m["zero_variance_groups"] == pytest.approx(5 / 6)
