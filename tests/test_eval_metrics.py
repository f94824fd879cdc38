"""Evaluation figures: format / exact / partial / lenient per completion, summary, table."""
from __future__ import annotations

import numpy as np
import pytest

from grpo_jax import eval_metrics
from grpo_jax.eval_metrics import (eval_scores, format_table, step_counts, summarize,
                                   wilson_interval)


def fmt(reasoning: str, answer: str) -> str:
    return f"<reasoning>{reasoning}</reasoning>\n<answer>{answer}</answer>"


# (completion, reference, format, exact, partial, lenient)
CASES = [
    # well-formed
    (fmt("6*7", "42"), "42", True, True, True, True),
    (fmt("6*7", " 42 "), "42", True, True, True, True),
    (fmt("6*7", "41"), "42", True, False, True, False),        # 41/42 = 0.976
    (fmt("guess", "100"), "42", True, False, False, False),    # far off
    (fmt("x", "110"), "100", True, False, True, False),        # ratio 1.1: edge, inside
    (fmt("x", "89"), "100", True, False, False, False),        # ratio 0.89: outside
    (fmt("x", "112"), "100", True, False, False, False),       # ratio 1.12: outside
    (fmt("x", "42 apples, not 7"), "42", True, True, True, False),  # first inside, last anywhere
    (fmt("x", "none"), "42", True, False, False, False),       # no number in the answer
    # numbers written with commas, $, signs, decimals
    (fmt("x", "$1,234"), "1234", True, True, True, True),
    (fmt("x", "1,234.00"), "1234", True, True, True, True),
    (fmt("x", "-5"), "-5", True, True, True, True),
    (fmt("x", "5"), "-5", True, False, False, False),          # sign matters: ratio -1
    (fmt("x", "-5.2"), "-5", True, False, True, False),
    (fmt("x", "2.5"), "2.50", True, True, True, True),
    (fmt("x", "0"), "0", True, True, True, True),
    (fmt("x", "0.05"), "0", True, False, False, False),        # reference 0: exact only
    # not the format
    ("The answer is $1,234.", "1234", False, False, False, True),
    ("We get 3 + 4 = 7\n#### 7", "7", False, False, False, True),
    ("It costs 12 dollars, so 12 - 2 = 10 left.", "12", False, False, False, False),
    ("<answer>42</answer>", "42", False, True, True, True),    # no reasoning block
    (fmt("x", "42") + "\nextra 43", "42", False, True, True, False),  # text after </answer>
    (fmt("a", "1") + fmt("b", "2"), "2", False, False, False, True),  # doubled: first block read
    ("", "42", False, False, False, False),
    ("no numbers at all", "42", False, False, False, False),
    ("<reasoning>so -3</reasoning>", "-3", False, False, False, True),
]


@pytest.mark.parametrize("completion,ref,f,e,p,l", CASES)
def test_eval_scores_table(completion, ref, f, e, p, l):
    scores = eval_scores([completion], [ref])
    assert scores == {"format": [f], "exact": [e], "partial": [p], "lenient": [l]}


def test_eval_scores_batch_matches_rows_and_implications():
    completions, refs = [c[0] for c in CASES], [c[1] for c in CASES]
    scores = eval_scores(completions, refs)
    for name, col in zip(("format", "exact", "partial", "lenient"), range(2, 6)):
        assert scores[name] == [c[col] for c in CASES], name
    assert all(p for e, p in zip(scores["exact"], scores["partial"]) if e)  # exact => partial


def test_eval_scores_bad_input():
    with pytest.raises(ValueError, match="reference"):
        eval_scores(["a", "b"], ["1"])
    # a reference with no number matches nothing, rather than aborting an evaluation
    assert eval_scores([fmt("x", "1")], ["n/a"])["exact"] == [False]
    assert eval_scores([None], ["1"]) == {"format": [False], "exact": [False],
                                          "partial": [False], "lenient": [False]}


def test_summarize():
    scores = eval_scores([fmt("x", "42"), fmt("x", "41"), "so 42", ""], ["42"] * 4)
    got = summarize(scores)
    assert {k: v for k, v in got.items() if not k.endswith("_ci95")} == {
        "format_accuracy": 0.5, "exact_accuracy": 0.25, "partial_accuracy": 0.5,
        "lenient_accuracy": 0.5, "num_problems": 4}
    np.testing.assert_allclose(got["exact_ci95"], wilson_interval(1, 4))
    np.testing.assert_allclose(got["format_ci95"], wilson_interval(2, 4))
    with pytest.raises(ValueError, match="no completions"):
        summarize(eval_scores([], []))
    with pytest.raises(ValueError, match="length"):
        summarize({**scores, "exact": [True]})
    with pytest.raises(ValueError, match="lack"):
        summarize({"format": [True]})


def test_format_table():
    base = {"format_accuracy": 0.0, "exact_accuracy": 0.125, "partial_accuracy": 0.25,
            "lenient_accuracy": 1 / 3, "num_problems": 8}
    trained = {"format_accuracy": 0.875, "exact_accuracy": 0.5, "partial_accuracy": 0.625,
               "lenient_accuracy": 1.0, "num_problems": 8}
    table = format_table({"base": base, "trained": trained})
    lines = table.splitlines()
    assert lines[0] == "| metric | base | trained |"
    assert lines[1] == "|---|---:|---:|"
    assert lines[2] == "| format | 0.0% | 87.5% |"
    assert lines[3] == "| exact | 12.5% | 50.0% |"
    assert lines[4] == "| partial (within 10%) | 25.0% | 62.5% |"
    assert lines[5] == "| lenient (last number) | 33.3% | 100.0% |"
    assert lines[6] == "| problems | 8 | 8 |"
    assert all(line.count("|") == 4 for line in lines)
    partial = format_table({"a": {"format_accuracy": 1.0}, "b": {}}).splitlines()
    assert partial[2] == "| format | 100.0% | - |" and partial[3] == "| exact | - | - |"
    assert len(partial) == 6  # no problems row when no model reports it
    with pytest.raises(ValueError):
        format_table({})


@pytest.mark.parametrize("k,n", [(0, 10), (1, 4), (5, 10), (10, 10), (46, 500), (0, 1)])
def test_wilson_interval_matches_scipy(k, n):
    from scipy.stats import binomtest  # a jax dependency: always installed

    want = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    np.testing.assert_allclose(wilson_interval(k, n), (want.low, want.high), atol=1e-7)
    with pytest.raises(ValueError):
        wilson_interval(n + 1, n)


def test_table_shows_intervals():
    table = format_table({"m": {"exact_accuracy": 0.25, "exact_ci95": [0.0456, 0.6994]}})
    assert "25.0% (4.6-69.9)" in table


def test_step_accuracy_is_pooled_over_stated_steps():
    completions = [fmt("160 - 48 = 112, 112 * 5 = 560", "560"),  # 2 right
                   "so 3 + 4 = 8 and 2 * 2 = 4 and 1 + 1 = 2",   # 2 right of 3, no format
                   fmt("no arithmetic here", "1"), ""]
    steps = step_counts(completions)
    assert [(c.stated, c.right) for c in steps] == [(2, 2), (3, 2), (0, 0), (0, 0)]
    got = summarize(eval_scores(completions, ["560"] * 4), steps)
    assert got["steps_stated"] == 5 and got["step_accuracy"] == pytest.approx(4 / 5)
    np.testing.assert_allclose(got["step_ci95"], wilson_interval(4, 5))
    none = summarize(eval_scores(completions[2:], ["1"] * 2), steps[2:])
    assert none["steps_stated"] == 0 and "step_accuracy" not in none
    with pytest.raises(ValueError, match="step counts"):
        summarize(eval_scores(completions, ["560"] * 4), steps[:2])
    table = format_table({"a": got, "b": none}).splitlines()
    assert "| arithmetic steps right | 80.0% (37.6-96.4) | - |" in table


def test_mcnemar_matches_scipys_binomial_test():
    from scipy.stats import binomtest

    rng = np.random.default_rng(0)
    for gained, lost in ((0, 0), (3, 5), (9, 65), (12, 2), (0, 7), (40, 40)):
        before = [False] * gained + [True] * lost + [True] * 30 + [False] * 20
        after = [True] * gained + [False] * lost + [True] * 30 + [False] * 20
        order = rng.permutation(len(before))
        got = eval_metrics.mcnemar([before[i] for i in order], [after[i] for i in order])
        assert (got["gained"], got["lost"]) == (gained, lost)
        want = 1.0 if gained + lost == 0 else binomtest(gained, gained + lost, 0.5).pvalue
        assert got["p"] == pytest.approx(want, rel=1e-9), (gained, lost)
    with pytest.raises(ValueError, match="same problems"):
        eval_metrics.mcnemar([True], [True, False])


def test_step_accuracy_difference_is_a_paired_bootstrap_over_problems():
    from grpo_jax.arithmetic import StepCounts

    # 200 problems of 3 steps: before gets 1 right of 3, after 2 of 3: +33 points.
    before = [StepCounts(3, 1, 0)] * 200
    after = [StepCounts(3, 2, 0)] * 200
    got = eval_metrics.step_accuracy_difference(before, after, resamples=500)
    assert got["difference"] == pytest.approx(1 / 3)
    assert got["ci95"] == pytest.approx([1 / 3, 1 / 3]) and got["p_no_gain"] == 0.0
    # The same accuracies, but the gain carried by a few problems with many steps: the
    # pooled difference is the same as in a float64 restatement, the interval wide.
    rng = np.random.default_rng(1)
    before = [StepCounts(int(s), int(r), 0) for s, r in zip(rng.integers(1, 6, 100),
                                                              rng.integers(0, 2, 100))]
    after = list(before)
    after[0] = StepCounts(40, 40, 0)
    got = eval_metrics.step_accuracy_difference(before, after, resamples=2000)
    want = sum(a.right for a in after) / sum(a.stated for a in after) - \
        sum(b.right for b in before) / sum(b.stated for b in before)
    assert got["difference"] == pytest.approx(want, rel=1e-12)
    assert got["ci95"][0] <= 0.0 < got["ci95"][1] and 0.2 < got["p_no_gain"] < 0.5
    with pytest.raises(ValueError, match="states no arithmetic steps"):
        eval_metrics.step_accuracy_difference([StepCounts(0, 0, 0)], [StepCounts(1, 1, 0)])


def test_compare_columns_pairs_records_by_problem():
    def rows(exact, steps):
        return [{"index": i, "exact": e, "steps_stated": s, "steps_right": r}
                for i, (e, (s, r)) in enumerate(zip(exact, steps))]

    records = {"sft": rows([True, False, False, False], [(2, 1), (2, 0), (1, 0), (0, 0)]),
               "trained": rows([True, True, True, False], [(2, 2), (2, 1), (1, 1), (1, 0)])}
    got = eval_metrics.compare_columns(records)
    assert (got["exact"]["gained"], got["exact"]["lost"]) == (2, 0)
    assert got["step_accuracy"]["difference"] == pytest.approx(4 / 6 - 1 / 5)
    text = eval_metrics.format_comparison(got, "SFT", "SFT+GRPO")
    assert "exact 2 gained, 0 lost (McNemar p = 0.5)" in text and "+46.7 points" in text
    records["trained"] = records["trained"][:3]
    assert eval_metrics.compare_columns(records) is None  # not the same problems
