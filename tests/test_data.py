"""Data: GSM8K rows from local files the tests write, malformed rows, gsm_symbolic's
split by template, SFT targets, the prompt template, and the resumable training order."""
from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest

from grpo_jax import data
from grpo_jax.config import DataConfig

GOOD = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A shirt costs $1,200 ...", "answer": "So it costs 1,200 dollars.\n#### 1,200"},
    {"question": "Temperature drops 5 below 2.", "answer": "#### -3"},
    {"question": "Half of 5?", "answer": "#### 2.5"},
]
BAD = [
    {"question": "No reference.", "answer": "just words"},        # no #### line
    {"question": "", "answer": "#### 4"},                          # empty question
    {"answer": "#### 4"},                                          # missing question
    {"question": "Q", "answer": "#### four"},                      # not a number
    ["not", "an", "object"],
]


def _write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_local_gsm8k_files(tmp_path, fmt):
    path = _write(tmp_path / f"train.{fmt}", GOOD, fmt)
    problems = data.problems_from_rows(data.read_local_rows(path), str(path))
    assert [p.answer for p in problems] == ["7", "1200", "-3", "2.5"]
    assert [p.index for p in problems] == [0, 1, 2, 3]
    assert problems[0].question == GOOD[0]["question"]


def test_malformed_rows_are_reported_and_skipped(tmp_path, caplog):
    rows = GOOD[:2] + BAD + GOOD[2:]
    path = _write(tmp_path / "mixed.jsonl", rows, "jsonl")
    with path.open("a") as f:
        f.write("{broken json\n")
    with caplog.at_level(logging.WARNING, logger="grpo_jax.data"):
        problems = data.problems_from_rows(data.read_local_rows(path), str(path))
    assert [p.index for p in problems] == [0, 1, 7, 8]
    for index in range(2, 7):
        assert f"malformed row {index}:" in caplog.text
    assert "malformed row 9:" in caplog.text  # the broken JSON line
    assert "neither '... #### N' nor a number" in caplog.text and "not a number: 'four'" in caplog.text


@pytest.mark.parametrize("bad_index", range(len(BAD)))
def test_malformed_row_refused_with_its_index(tmp_path, bad_index):
    rows = GOOD[:1] + [BAD[bad_index]]
    with pytest.raises(data.DataError, match=r"rows\.jsonl: row 1: "):
        data.problems_from_rows(rows, "rows.jsonl", on_malformed="error")


def test_missing_and_unsupported_files(tmp_path):
    cfg = DataConfig(dataset=str(tmp_path / "nope.jsonl"))
    with pytest.raises(data.DataError, match="dataset file not found: .*nope.jsonl"):
        data.load_problems(cfg, "train")
    (tmp_path / "rows.csv").write_text("question,answer\n")
    with pytest.raises(data.DataError, match="unsupported file type '.csv'"):
        data.read_local_rows(tmp_path / "rows.csv")
    with pytest.raises(data.DataError, match="unknown dataset 'gsm9k'"):
        data.load_problems(DataConfig(dataset="gsm9k"), "train")
    with pytest.raises(data.DataError, match="no usable problems"):
        data.problems_from_rows(BAD, "all-bad")


def test_local_train_file_needs_an_eval_file(tmp_path):
    path = _write(tmp_path / "train.jsonl", GOOD, "jsonl")
    cfg = DataConfig(dataset=str(path))
    assert len(data.load_problems(cfg, "train")) == 4
    with pytest.raises(data.DataError, match="--data.eval-dataset FILE"):
        data.load_problems(cfg, "eval")
    held = _write(tmp_path / "test.json", GOOD[:2], "json")
    assert len(data.load_problems(DataConfig(dataset=str(path), eval_dataset=str(held)),
                                  "eval")) == 2


def test_gsm_symbolic_splits_by_template():
    """Training never sees a held-out template; 'eval' is only those; the same-template
    split shares training's templates but none of its questions; all deterministic."""
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok

    # The documented set: every fifth of reasoning-gym's generators.
    assert data.HELD_OUT_TEMPLATES == set(sorted(tasks_ok)[::5])
    cfg = DataConfig(num_train=120, num_eval=40)
    train = data.load_problems(cfg, "train")
    held = data.load_problems(cfg, "eval")
    same = data.load_problems(cfg, "eval_same_template")
    assert len(train) == 120 and len(held) == 40 and 0 < len(same) <= 40
    train_templates = {p.template for p in train}
    assert not train_templates & data.HELD_OUT_TEMPLATES
    assert {p.template for p in held} <= data.HELD_OUT_TEMPLATES
    assert {p.template for p in same} <= set(tasks_ok) - data.HELD_OUT_TEMPLATES
    assert len({p.template for p in held}) > 5 and len(train_templates) > 30
    assert not {p.question for p in train} & ({p.question for p in held} | {p.question for p in same})
    for p in train + held + same:
        float(p.answer)  # every reference is a number
    # Deterministic, and a longer stream extends a shorter one (so every machine and
    # every size agrees on the first problems).
    assert data.load_problems(cfg, "eval") == held
    longer = data.load_problems(DataConfig(num_train=120, num_eval=80), "eval")
    assert longer[:40] == held


def test_installed_gsm_symbolic_is_the_one_the_held_out_set_was_fixed_against():
    assert data.gsm_symbolic_fingerprint() == data.GSM_SYMBOLIC_FINGERPRINT
    versions = data.source_versions(DataConfig())
    assert versions["gsm_symbolic_fingerprint"] == data.GSM_SYMBOLIC_FINGERPRINT
    assert versions["reasoning-gym"]  # the installed version, recorded in config/eval.json


def test_another_gsm_symbolic_is_refused_in_one_line(monkeypatch):
    """A reasoning-gym whose generators draw other problems would change the
    evaluation set under the same template numbers: refused before any problem."""
    monkeypatch.setattr(data, "GSM_SYMBOLIC_FINGERPRINT", "0" * 16)
    with pytest.raises(data.DataError, match=r"generates other problems \(fingerprint "
                       + data.gsm_symbolic_fingerprint()) as e:
        data.load_problems(DataConfig(num_train=8, num_eval=4), "eval")
    assert "\n" not in str(e.value) and "constraints.txt" in str(e.value)


def test_sft_targets_are_what_the_rewards_ask_for(tmp_path):
    """gsm_symbolic's worked solutions and GSM8K rows become
    <reasoning>solution</reasoning><answer>N</answer>, which the format reward scores as
    exactly formatted and the answer reward as correct; a row without a worked
    solution cannot be an SFT target."""
    from grpo_jax import rewards

    symbolic = data.load_problems(DataConfig(num_train=12, num_eval=4), "train")
    local = data.problems_from_rows(GOOD, "good")
    with_solution = symbolic + [p for p in local if p.solution]
    assert len(with_solution) == 14 and local[0].solution == "3 + 4 = 7"
    targets = [data.sft_target(p) for p in with_solution]
    answers = [p.answer for p in with_solution]
    best = rewards.RewardConfig()
    assert all(s == best.format_exact for s in rewards.match_format_exactly(targets, answers))
    assert all(s == best.answer_exact for s in rewards.check_answer(targets, answers))
    assert not any("####" in t for t in targets)
    for p in local[2:]:  # "#### -3", "#### 2.5": no worked solution
        assert p.solution is None
        with pytest.raises(data.DataError, match=f"problem {p.index} has no worked solution"):
            data.sft_target(p)


def test_config_refuses_equal_seeds_and_bad_modes():
    with pytest.raises(ValueError, match="train_seed and eval_seed"):
        DataConfig(train_seed=3, eval_seed=3)
    with pytest.raises(ValueError, match="on_malformed"):
        DataConfig(on_malformed="ignore")


def test_prompt_template_is_a_gemma_user_turn():
    prompt = data.format_prompt("  What is 2+2?\n")
    assert prompt.startswith("<start_of_turn>user\n") and prompt.endswith("<start_of_turn>model\n")
    assert "<reasoning>" in prompt and "<answer>" in prompt and "What is 2+2?<end_of_turn>" in prompt


def test_long_prompts_keep_bos_and_their_end():
    from grpo_jax.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    problems = [data.Problem("What is 2+2?", "4", 0), data.Problem("x" * 600, "1", 1)]
    whole = data.encode_prompts(tok, problems, "plain", "<reasoning>")
    cut = data.encode_prompts(tok, problems, "plain", "<reasoning>", max_tokens=40)
    for ids, full in zip(cut, whole):
        assert len(ids) == min(40, len(full)) and ids[0] == tok.bos_id == full[0]
        assert ids[1:] == full[len(full) - len(ids) + 1:]  # the end, where the answer begins
        assert tok.decode(ids).endswith("Solution:\n<reasoning>")
    assert len(whole[0]) > 40  # the instruction alone is longer: both are cut
    # As a run's data config sets it (sampling, SFT):
    assert data.run_prompts(tok, problems, DataConfig(prompt_style="plain", prefill="<reasoning>",
                                                      max_prompt_tokens=40)) == cut
    assert data.encode_prompts(tok, problems, "plain", max_tokens=10_000) == \
        data.encode_prompts(tok, problems, "plain")
    for bad in (0, 1, -5):
        with pytest.raises(ValueError, match="data.max_prompt_tokens must be at least 2"):
            DataConfig(max_prompt_tokens=bad)


def test_training_order_is_a_pure_function_of_the_position():
    n, seed = 7, 11
    stream = data.order_at(n, seed, 0, 3 * n)
    for epoch in range(3):  # every epoch is a permutation, and they differ
        assert sorted(stream[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n:2 * n])
    # Resuming at any position gives the same continuation.
    for position in (0, 5, 7, 13):
        np.testing.assert_array_equal(data.order_at(n, seed, position, 4),
                                      stream[position:position + 4])
    assert not np.array_equal(data.order_at(n, seed + 1, 0, n), stream[:n])
    problems = [data.Problem(f"q{i}", str(i), i) for i in range(n)]
    assert [p.index for p in data.batch_at(problems, seed, 5, 4)] == stream[5:9].tolist()


def test_plain_prompt_with_prefill_for_base_models():
    plain = data.format_prompt("  What is 2+2?\n", "plain", "<reasoning>")
    assert plain == (f"{data.SYSTEM_PROMPT}\n\nProblem: What is 2+2?\n\nSolution:\n"
                     "<reasoning>")
    assert "<start_of_turn>" not in plain
    chat = data.format_prompt("What is 2+2?", "chat", "<reasoning>")
    assert chat == data.format_prompt("What is 2+2?") + "<reasoning>"
    with pytest.raises(ValueError, match="prompt_style must be one of chat, plain"):
        DataConfig(prompt_style="fancy")
    # The SFT target continues the prefill: prefill + target is the whole tagged answer.
    problem = data.Problem("Q", "7", 0, solution="3 + 4 = 7")
    full = data.sft_target(problem)
    assert "<reasoning>" + data.sft_target(problem, "<reasoning>") == full
    with pytest.raises(data.DataError, match="prefill"):
        data.sft_target(problem, "<answer>")


def test_held_out_problems_come_in_the_number_asked_for(tmp_path, caplog, monkeypatch):
    """An evaluation of more problems than data.num_eval gets them all (the generated
    set is drawn longer; its first problems are the same), the same-template split
    too, though it drops training questions; a fixed file gives what it has and says
    so."""
    cfg = DataConfig(num_train=120, num_eval=10)
    held = data.held_out_problems(cfg, "eval", 30)
    assert len(held) == 30 and held[:10] == data.load_problems(cfg, "eval")
    assert data.held_out_problems(cfg, "eval", 4) == held[:4]
    # Enough training questions that the same-template split must drop some.
    many = DataConfig(num_train=3000, num_eval=10)
    same = data.held_out_problems(many, "eval_same_template", 200)
    dropped = 200 - len(data.load_problems(dataclasses.replace(many, num_eval=200),
                                           "eval_same_template"))
    assert len(same) == 200 and dropped > 0
    assert not {p.question for p in same} & {p.question for p in data.load_problems(many, "train")}
    path = _write(tmp_path / "held.jsonl", GOOD, "jsonl")
    # An in-process CLI earlier in the session may have stopped the package logger
    # propagating to pytest's handler.
    monkeypatch.setattr(logging.getLogger("grpo_jax"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="grpo_jax.data"):
        got = data.held_out_problems(DataConfig(dataset=str(path), eval_dataset=str(path)),
                                     "eval", 10)
    assert len(got) == len(GOOD) and "10 held-out problems asked for" in caplog.text
    with pytest.raises(ValueError, match="held-out split"):
        data.held_out_problems(cfg, "train", 3)
