"""Reward functions: a table of completions with the expected score of each function,
configurable scores, weighted scoring, pluggable rewards and bad input."""
from __future__ import annotations

import random

import numpy as np
import pytest

from grpo_jax import rewards
from grpo_jax.rewards import (RewardConfig, check_answer, check_numbers, match_format_approximately,
                              match_format_exactly, score_completions)

R = "<reasoning>Add them up.</reasoning>"


def _a(x: str) -> str:
    return f"{R}<answer>{x}</answer>"


# (completion, reference, exactly, approximately, check_answer, check_numbers)
TABLE = [
    # well-formed, exact answers in many spellings
    (_a("42"), "42", 3.0, 2.0, 3.0, 1.5),
    (f"  {R}\n<answer> 42 </answer>\n  ", "42", 3.0, 2.0, 3.0, 1.5),
    ("<reasoning>\nline 1\nline 2\n</reasoning>\n<answer>\n7\n</answer>", "7", 3.0, 2.0, 3.0, 1.5),
    (_a("1,234"), "1234", 3.0, 2.0, 3.0, 1.5),
    (_a("1234"), "1,234", 3.0, 2.0, 3.0, 1.5),
    (_a("1,234"), "1,234", 3.0, 2.0, 3.0, 1.5),
    (_a("$1,234.50"), "1234.5", 3.0, 2.0, 3.0, 1.5),
    (_a("-7"), "-7", 3.0, 2.0, 3.0, 1.5),
    (_a("\u22123.50"), "-3.5", 3.0, 2.0, 3.0, 1.5),
    (_a("12%"), "12", 3.0, 2.0, 3.0, 1.5),
    (_a("12.5%"), "12.5", 3.0, 2.0, 3.0, 1.5),
    (_a("42 apples"), "42", 3.0, 2.0, 3.0, 1.5),
    (_a("3.0"), "3", 3.0, 2.0, 3.0, 1.5),
    (_a("0.5"), ".5", 3.0, 2.0, 3.0, 1.5),
    (_a("$18"), "18", 3.0, 2.0, 3.0, 1.5),
    (_a("The answer is 1,000,000 dollars."), "1000000", 3.0, 2.0, 3.0, 1.5),
    (_a("0.0"), "0", 3.0, 2.0, 3.0, 1.5),
    # close and wrong numbers (check_answer's ratio bands)
    (_a("45"), "42", 3.0, 2.0, 0.5, 0.0),      # ratio 1.071
    (_a("38"), "42", 3.0, 2.0, 0.5, 0.0),      # 0.905
    (_a("110"), "100", 3.0, 2.0, 0.5, 0.0),    # 1.1 exactly: inside the 10% band
    (_a("50"), "42", 3.0, 2.0, 0.25, 0.0),     # 1.190
    (_a("35"), "42", 3.0, 2.0, 0.25, 0.0),     # 0.833
    (_a("60"), "42", 3.0, 2.0, -1.0, 0.0),     # 1.43
    (_a("-42"), "42", 3.0, 2.0, -1.0, 0.0),    # negative ratio
    (_a("4.2"), "42", 3.0, 2.0, -1.0, 0.0),
    (_a("1"), "0", 3.0, 2.0, -1.0, 0.0),       # reference 0: no ratio
    # unparsable answers
    (_a("five"), "5", 3.0, 2.0, -0.5, 0.0),
    (_a("3 or 4"), "3", 3.0, 2.0, -0.5, 1.5),  # two numbers: ambiguous, but the first matches
    (_a("18 dollars and 2 cents"), "18", 3.0, 2.0, -0.5, 1.5),
    (_a(""), "5", 0.0, 2.0, -0.5, 0.0),        # empty answer block is not the format
    (_a("   "), "5", 0.0, 2.0, -0.5, 0.0),
    # missing, doubled, misplaced tags
    (f"{R} 42", "42", 0.0, 0.0, 0.0, 0.0),
    ("<answer>42</answer>", "42", 0.0, 0.0, 3.0, 1.5),
    (f"{R}<answer>42", "42", 0.0, 1.0, 0.0, 0.0),
    (f"{R}<answer>42</answer><answer>42</answer>", "42", 0.0, 0.0, 3.0, 1.5),
    (f"{R}<answer>41</answer><answer>42</answer>", "42", 0.0, 0.0, 0.5, 0.0),  # the first counts
    ("<reasoning>a</reasoning><reasoning>b</reasoning><answer>42</answer>", "42",
     0.0, 0.0, 3.0, 1.5),
    (f"{R}<answer><reasoning>42</answer>", "42", 0.0, 1.0, 3.0, 1.5),
    ("<answer>42</answer><reasoning>x</reasoning>", "42", 0.0, 2.0, 3.0, 1.5),
    ("<reasoning></reasoning><answer>42</answer>", "42", 0.0, 2.0, 3.0, 1.5),
    ("<REASONING>x</REASONING><ANSWER>42</ANSWER>", "42", 0.0, -2.0, 0.0, 0.0),
    # extra text outside the blocks
    (_a("42") + " and more", "42", 0.0, 2.0, 3.0, 1.5),
    (_a("42") + "\nExtra line", "42", 0.0, 2.0, 3.0, 1.5),
    ("Sure! " + _a("42"), "42", 0.0, 2.0, 3.0, 1.5),
    (f"{R} so <answer>42</answer>", "42", 0.0, 2.0, 3.0, 1.5),
    # empty, garbage, huge
    ("", "42", 0.0, -2.0, 0.0, 0.0),
    ("x" * 100_000, "42", 0.0, -2.0, 0.0, 0.0),
    ("\U0001f916 \u2211 <answer \x00 </answer", "42", 0.0, -2.0, 0.0, 0.0),
    ("<answer>" + "9" * 5000 + "</answer>", "42", 0.0, 0.0, -1.0, 0.0),  # parses to inf
    ("<reasoning>" + "<>/" * 20_000 + "</reasoning><answer>7</answer>", "7", 3.0, 2.0, 3.0, 1.5),
]

FUNCS = [match_format_exactly, match_format_approximately, check_answer, check_numbers]


def test_table_is_large_enough():
    assert len(TABLE) >= 40


@pytest.mark.parametrize("col,fn", list(enumerate(FUNCS, start=2)), ids=[f.__name__ for f in FUNCS])
def test_reward_table(col, fn):
    completions = [row[0] for row in TABLE]
    answers = [row[1] for row in TABLE]
    got = fn(completions, answers)
    assert isinstance(got, list) and len(got) == len(TABLE)
    wrong = [(i, TABLE[i][0][:60], TABLE[i][1], g, TABLE[i][col])
             for i, g in enumerate(got) if g != TABLE[i][col]]
    assert not wrong, f"{fn.__name__} mismatches (row, completion, ref, got, want): {wrong}"


def test_scores_are_configurable():
    cfg = RewardConfig(format_exact=5.0, tag_once=1.0, tag_not_once=-2.0, answer_exact=4.0,
                       answer_within_10pct=0.3, answer_within_20pct=0.1, answer_wrong=-3.0,
                       answer_unparsable=-0.7, answer_missing=-9.0, number_match=2.5)
    comps = [_a("42"), _a("45"), _a("50"), _a("60"), _a("x"), "nothing", f"{R}<answer>42"]
    refs = ["42"] * len(comps)
    assert match_format_exactly(comps, refs, cfg=cfg) == [5.0] * 5 + [0.0, 0.0]
    assert match_format_approximately(comps, refs, cfg=cfg)[5:] == [-8.0, 1.0]
    assert check_answer(comps, refs, cfg=cfg) == [4.0, 0.3, 0.1, -3.0, -0.7, -9.0, -9.0]
    assert check_numbers(comps, refs, cfg=cfg) == [2.5] + [0.0] * 6


def test_score_completions_weighted_sum_and_per_function():
    comps = [row[0] for row in TABLE]
    refs = [row[1] for row in TABLE]
    weights = {"match_format_exactly": 0.5, "match_format_approximately": 2.0,
               "check_answer": 1.0, "check_numbers": -1.0}
    cfg = RewardConfig(functions=tuple(weights.items()))
    total, per = score_completions(comps, refs, cfg)
    assert set(per) == set(weights)
    want = np.zeros(len(TABLE))
    for col, fn in enumerate(FUNCS, start=2):
        expected = np.array([row[col] for row in TABLE])
        np.testing.assert_array_equal(per[fn.__name__], expected)
        want += weights[fn.__name__] * expected
    assert total.shape == (len(TABLE),) and total.dtype == np.float64
    np.testing.assert_allclose(total, want, rtol=0, atol=1e-12)


def test_plugged_in_reward_and_subset():
    rewards.register_reward("length_penalty", lambda c, a: [-len(x) / 100 for x in c])
    try:
        cfg = RewardConfig(functions=(("check_numbers", 1.0), ("length_penalty", 2.0)))
        total, per = score_completions([_a("42"), "no"], ["42", "42"], cfg)
        assert list(per) == ["check_numbers", "length_penalty"]
        np.testing.assert_allclose(per["length_penalty"], [-len(_a("42")) / 100, -0.02])
        np.testing.assert_allclose(total, [1.5 - 2 * len(_a("42")) / 100, -0.04])
    finally:
        rewards._REGISTRY.pop("length_penalty", None)


def test_never_raises_on_random_text():
    rng = random.Random()
    pieces = ["<reasoning>", "</reasoning>", "<answer>", "</answer>", "<", ">", "/", "$", ",",
              "%", "-", "\u2212", ".", "1", "23", "4,567", " ", "\n", "abc", "\x00", "\U0001f600",
              "9" * 400, "e", "+"]
    comps = ["".join(rng.choice(pieces) for _ in range(rng.randrange(0, 40))) for _ in range(300)]
    refs = [rng.choice(["42", "1,234", "-7", "0", "3.5", "", "abc", "1e5"]) for _ in comps]
    total, per = score_completions(comps, refs)
    assert np.all(np.isfinite(total))
    for fn in FUNCS:
        assert len(fn(comps, refs)) == len(comps)


@pytest.mark.parametrize("text,value", [
    ("1,234", 1234.0), ("$1,234.50", 1234.5), ("-7", -7.0), ("12%", 12.0), ("42 apples", 42.0),
    ("3.0", 3.0), ("x = 5.", 5.0), ("-$5", -5.0), ("nothing", None), ("1 and 2", None),
])
def test_parse_number(text, value):
    assert rewards.parse_number(text) == value


def test_bad_input_errors():
    with pytest.raises(ValueError, match="2 completions but 1 reference"):
        check_answer(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="2 completions but 1 reference"):
        score_completions(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        score_completions(["a"], ["1"], RewardConfig(functions=(("nope", 1.0),)))
    with pytest.raises(ValueError, match="empty"):
        RewardConfig(functions=())
    with pytest.raises(ValueError, match="finite weight"):
        RewardConfig(functions=(("check_answer", float("nan")),))
    with pytest.raises(ValueError, match="twice"):
        RewardConfig(functions=(("check_answer", 1.0), ("check_answer", 2.0)))
    rewards.register_reward("nan_reward", lambda c, a: [float("nan")] * len(c))
    rewards.register_reward("short_reward", lambda c, a: [0.0])
    try:
        with pytest.raises(ValueError, match="'nan_reward' returned non-finite scores at rows"):
            score_completions(["a", "b"], ["1", "2"],
                              RewardConfig(functions=(("nan_reward", 1.0),)))
        with pytest.raises(ValueError, match="'short_reward' returned 1 scores for 2"):
            score_completions(["a", "b"], ["1", "2"],
                              RewardConfig(functions=(("short_reward", 1.0),)))
    finally:
        rewards._REGISTRY.pop("nan_reward", None)
        rewards._REGISTRY.pop("short_reward", None)
