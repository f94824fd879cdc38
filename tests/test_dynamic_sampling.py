"""Dynamic sampling (grpo.filter_zero_variance): groups whose rewards are all equal are
left out, more rounds are drawn until the batch holds num_prompts informative groups or
the round bound is hit, the batch is topped up with left-out groups when short, and the
problem stream position (state, in the checkpoints) survives a resume exactly."""
from __future__ import annotations

import dataclasses
import json
import types

import jax
import numpy as np
import pytest

from grpo_jax import rewards, rollout, runs, train
from grpo_jax.checkpoint import Checkpointer
from grpo_jax.model import lora as lora_lib
from grpo_jax.model.config import model_preset
from grpo_jax.update import make_optimizer
from grpo_jax.config import GRPOConfig
from grpo_jax.decode import SampleOutput
from grpo_jax.presets import TRAIN_PRESETS

TINY = dataclasses.replace(TRAIN_PRESETS["tiny"], tensorboard=False, eval_problems=0)
G = 2


def _round(tag: int, totals) -> rollout.Round:
    """A scored round of len(totals) // G prompts whose every value names (tag, row)."""
    n = len(totals)
    b = n // G
    rows = np.arange(n) + 100 * tag
    out = SampleOutput(tokens=np.stack([rows, rows], 1), logprobs=np.zeros((n, 2)),
                       sampling_logprobs=np.zeros((n, 2)), lengths=rows,
                       stopped=np.ones(n, bool), steps=np.int32(tag))
    prompts = np.arange(b)[:, None] + 100 * tag
    return rollout.Round([f"p{tag}.{i}" for i in range(b)], prompts, prompts > 0, out,
                         [f"t{tag}.{r}" for r in range(n)], np.asarray(totals, float),
                         {"r": np.asarray(totals, float) * 2})


def test_informative_groups_are_those_with_any_spread():
    total = np.asarray([1.0, 1.0, 0.0, 0.5, -2.0, -2.0, 3.0, 3.0 + 1e-6])
    np.testing.assert_array_equal(rollout.informative_groups(total, 2),
                                  [False, True, False, True])


def test_pick_groups_keeps_exactly_the_informative_groups_in_draw_order():
    # Round 0: groups 0 and 2 flat; round 1: group 1 flat. B = 3.
    rounds = [_round(0, [1, 1, 0, 1, 2, 2]), _round(1, [0, 3, 4, 4, 1, 0])]
    picks, signal = rollout.pick_groups(rounds, G, 3, filtering=True)
    assert picks == [(0, 1), (1, 0), (1, 2)] and signal == 3
    # Past the batch: informative groups drawn beyond B are not used.
    picks, signal = rollout.pick_groups(rounds, G, 2, filtering=True)
    assert picks == [(0, 1), (1, 0)] and signal == 2
    # Short of B after the bound: topped up with left-out groups, in draw order.
    picks, signal = rollout.pick_groups(rounds[:1], G, 3, filtering=True)
    assert picks == [(0, 1), (0, 0), (0, 2)] and signal == 1
    # Off: round 0 as drawn, whatever its rewards.
    picks, signal = rollout.pick_groups(rounds, G, 3, filtering=False)
    assert picks == [(0, 0), (0, 1), (0, 2)] and signal == 1


def test_gather_groups_takes_whole_groups_from_their_rounds():
    rounds = [_round(0, [1, 1, 0, 1]), _round(1, [5, 6, 7, 7])]
    got = rollout.gather_groups(rounds, [(1, 0), (0, 1)], G)
    assert got.problems == ["p1.0", "p0.1"]
    np.testing.assert_array_equal(got.prompt_tokens[:, 0], [100, 1])
    np.testing.assert_array_equal(got.rollout.tokens[:, 0], [100, 101, 2, 3])
    np.testing.assert_array_equal(got.rollout.lengths, [100, 101, 2, 3])
    assert got.texts == ["t1.0", "t1.1", "t0.2", "t0.3"]
    np.testing.assert_array_equal(got.total, [5, 6, 0, 1])
    np.testing.assert_array_equal(got.per_function["r"], [10, 12, 0, 2])
    assert int(got.rollout.steps) == 1  # the longest decode of the rounds


def _ctx(filtering: bool, rounds: int, b: int = 3):
    cfg = dataclasses.replace(TINY, grpo=dataclasses.replace(
        TINY.grpo, num_prompts=b, group_size=G, filter_zero_variance=filtering,
        max_resample_rounds=rounds))
    return types.SimpleNamespace(cfg=cfg, sampling_key=jax.random.key(0))


@pytest.mark.parametrize("filtering,bound,scripted,want", [
    # Enough after the second round: stops there, drops 3 flat groups.
    (True, 3, [[1, 1, 0, 1, 2, 2], [0, 3, 4, 4, 1, 0], [0, 1, 0, 1, 0, 1]],
     dict(rounds=2, informative_groups=3, dropped_groups=3, filled_groups=0,
          samples_drawn=12, informative_drawn=3)),
    # The bound hit: one extra round, still short, topped up with two flat groups.
    (True, 1, [[1, 1, 0, 0, 2, 2], [3, 3, 4, 4, 1, 0]],
     dict(rounds=2, informative_groups=1, dropped_groups=3, filled_groups=2,
          samples_drawn=12, informative_drawn=1)),
    # Off: one round, nothing dropped, whatever the spread.
    (False, 3, [[1, 1, 0, 0, 2, 2]],
     dict(rounds=1, informative_groups=0, dropped_groups=0, filled_groups=0,
          samples_drawn=6, informative_drawn=0)),
])
def test_draw_batch_rounds_positions_keys_and_metrics(monkeypatch, filtering, bound,
                                                      scripted, want):
    calls = []

    def fake_round(ctx, params, lora, key, position):
        calls.append((position, np.asarray(jax.random.key_data(key)).tolist()))
        return _round(len(calls) - 1, scripted[len(calls) - 1])

    monkeypatch.setattr(rollout, "sample_round", fake_round)
    ctx = _ctx(filtering, bound)
    batch, drawn, metrics = rollout.draw_batch(ctx, None, None, step=5, position=40)
    assert [p for p, _ in calls] == [40 + 3 * r for r in range(want["rounds"])]
    keys = [k for _, k in calls]
    step_key = jax.random.fold_in(ctx.sampling_key, 5)
    assert keys[0] == np.asarray(jax.random.key_data(step_key)).tolist()
    assert len({str(k) for k in keys}) == len(keys)  # every round draws fresh samples
    assert len(drawn) == want["rounds"] and len(batch.problems) == 3
    assert batch.total.shape == (6,) and batch.rollout.tokens.shape == (6, 2)
    for key, value in want.items():
        assert metrics[f"dynamic/{key}"] == value, key
    assert metrics["dynamic/samples_per_informative_group"] == \
        want["samples_drawn"] / max(want["informative_groups"], 1)
    if filtering:
        signal = rollout.informative_groups(batch.total, G)
        assert signal.sum() == want["informative_groups"] and signal[:signal.sum()].all()


def test_max_resample_rounds_must_not_be_negative():
    with pytest.raises(ValueError, match="max_resample_rounds must be >= 0"):
        GRPOConfig(max_resample_rounds=-1)


# ---------------------------------------------------------------------------
# Through the trainer, on the tiny model.


def _answer_parity(completions, answers):
    """Constant (0) for problems with an even answer: those groups carry no signal;
    the completion's length parity otherwise: most of those groups do."""
    return [float(len(c) % 2) if int(float(a)) % 2 else 0.0
            for c, a in zip(completions, answers)]


rewards.register_reward("answer_parity", _answer_parity)


def _cfg(run_dir, **grpo):
    return dataclasses.replace(
        TINY, output_dir=str(run_dir), steps=4, save_every=2,
        rewards=rewards.RewardConfig(functions=(("answer_parity", 1.0),)),
        grpo=dataclasses.replace(TINY.grpo, **grpo))


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class Interrupted(Exception):
    pass


def test_filtered_run_trains_on_informative_groups_and_resumes_exactly(tmp_path, monkeypatch):
    filtered = _cfg(tmp_path / "full", filter_zero_variance=True, max_resample_rounds=3)
    train.train(filtered)
    rows = _rows(tmp_path / "full")
    b = filtered.grpo.num_prompts
    position = filtered.data_position(0)
    for row in rows:
        position += row["dynamic/rounds"] * b
        assert row["data_position"] == position  # every round used up B problems
        assert row["dynamic/informative_groups"] + row["dynamic/filled_groups"] == b
        assert row["dynamic/samples_drawn"] == row["dynamic/rounds"] * b * G * 2
    assert any(r["dynamic/rounds"] > 1 for r in rows), "the reward never left a group flat"
    assert any(r["dynamic/informative_groups"] == b for r in rows)
    # The learning-rate schedule counts updates: one per step, however many rounds.
    ckpt = Checkpointer(tmp_path / "full", fingerprint=runs.run_fingerprint(filtered))
    try:
        lora = lora_lib.init_lora(model_preset(filtered.model), filtered.lora,
                                  train.run_keys(filtered.seed)[0])
        state = ckpt.restore_latest({"lora": lora, "opt_state": make_optimizer(
            filtered.optimizer, filtered.total_updates).init(lora)})
    finally:
        ckpt.close()
    counts = [int(x) for x in jax.tree.leaves(state.state["opt_state"])
              if np.ndim(x) == 0 and np.issubdtype(np.asarray(x).dtype, np.integer)]
    assert counts and set(counts) == {filtered.steps}, counts
    assert state.meta["data_position"] == rows[-1]["data_position"]

    half = dataclasses.replace(filtered, output_dir=str(tmp_path / "half"))
    real = rollout.grpo_step

    def stop_before_3(ctx, params, state, step, position):
        if step == 3:
            raise Interrupted
        return real(ctx, params, state, step, position)

    monkeypatch.setattr(rollout, "grpo_step", stop_before_3)
    with pytest.raises(Interrupted):
        train.train(half)
    monkeypatch.undo()
    train.train(half)
    resumed = _rows(tmp_path / "half")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b_ in zip(rows, resumed):
        for key in ("reward/mean", "loss", "kl", "data_position", "dynamic/rounds",
                    "dynamic/informative_groups", "grad_norm"):
            assert a[key] == pytest.approx(b_[key], abs=1e-5), (a["step"], key)

