"""The arithmetic-step reward (rewards.check_steps, grpo_jax.arithmetic): a hand-made
table of completions with the score each must get, completions written to game it,
adversarial text it must survive, and the recipe's weights (a right answer beats any
steps)."""
from __future__ import annotations

import random
import time
from fractions import Fraction

import pytest

from grpo_jax import arithmetic, presets, rewards
from grpo_jax.rewards import check_steps, score_completions

Q = ("James gets 160 emails a day. 30% of those emails don't require any response. "
     "How many emails does he respond to in a 5 day work week?")  # answer 560
Q2 = ("A shop sells 3 boxes of 12 pens at $2.50 a pen, and 1/2 of a box of 8 erasers. "
      "It had 1,250 pens.")


def _c(reasoning: str, answer: str = "560") -> str:
    return f"<reasoning>{reasoning}</reasoning>\n<answer>{answer}</answer>"


# (completion, question, expected score) with the default step_credit of 1.
TABLE = [
    # every step right and grounded
    (_c("160 * 30% = 48. 160 - 48 = 112. 112 * 5 = 560."), Q, 1.0),
    (_c("160*30/100=48\n160-48=112\n112*5=560"), Q, 1.0),  # 100: a conventional constant
    (_c("160 x 0.3 = 48, then 160 − 48 = 112 and 112 × 5 = 560"), Q, 1.0),  # 0.3 is 30%
    (_c("He ignores 160 * 30% = 48 emails"), Q, 1.0),
    (_c("160 emails - 48 emails = 112 emails"), Q, 0.0),  # 48 comes from nowhere
    (_c("160 * 30% = 48\n160 emails - 48 emails = 112 emails"), Q, 1.0),  # units between
    (_c("160 * 0.7 = 112; 112 * 5 = 560"), Q, 1.0),  # 0.7: the complement of 30%
    (_c("160 * 0.65 = 104; 104 * 5 = 520"), Q, 0.0),  # 0.65 from nowhere, 104 built on it
    (_c("112 * 5 = 560"), Q, 0.0),  # 112 was never derived
    (_c("160 * 30% = 48 so 160 - 48 = 112, 112 + 0 = 112"), Q, 2 / 3),  # 0 not grounded
    (_c("160 - 48 = 112 = 112 + 0"), Q, 0.0),  # "= 112 + 0" has no result: one step
    (_c("160 + 30 + 5 = 195"), Q, 1.0),  # a chain
    (_c("160 + 30 = 190 + 5 = 195"), Q, 1.0),  # a running chain: two steps
    (_c("160 - 30 * 5 = 10"), Q, 1.0),  # * before -
    (_c("160 - 30 * 5 = 650"), Q, 0.0),  # left to right is wrong
    (_c("5 - 160 = -155"), Q, 1.0),  # negative result
    (_c("160 / 30 = 5.33"), Q, 1.0),  # rounded to the decimals written
    (_c("160 / 30 = 5.3"), Q, 1.0),
    (_c("160 / 30 = 5.34"), Q, 0.0),  # misrounded
    (_c("160 / 30 = 5"), Q, 0.0),  # an integer result must be exact
    (_c("160 * 30% = 48.00"), Q, 1.0),
    (_c("160 / 0 = 5"), Q, 0.0),  # division by zero: a wrong step
    (_c("3 * 12 = 36; 36 * $2.50 = $90.00"), Q2, 1.0),  # currency, decimals
    (_c("3 * 12 = 36. 1,250 - 36 = 1,214"), Q2, 1.0),  # thousands commas
    (_c("3 * 12 = 36. 1250 - 36 = 1214"), Q2, 1.0),  # 1250 is the question's 1,250
    (_c("1,250 - 36 = 1,214"), Q2, 0.0),  # 36 not derived yet
    (_c("8 * 1/2 = 4"), Q2, 1.0),  # a fraction from the question
    (_c("8 / 2 = 4"), Q2, 1.0),  # "1/2" states 2 (and half is 2 anyway)
    (_c("3 x 12 = 36 pens"), Q2, 1.0),  # "x" as times
    (_c("3x12=36"), Q2, 1.0),
    # wrong arithmetic
    (_c("160 * 30% = 50. 160 - 50 = 110. 110 * 5 = 550."), Q, 2 / 3),
    (_c("160 * 30% = 48. 160 - 48 = 122. 122 * 5 = 620."), Q, 1 / 3),
    (_c("133 * 6 = 1096"), "He bakes 133 cookies a day for 6 days.", 0.0),
    (_c("133 * 6 = 798"), "He bakes 133 cookies a day for 6 days.", 1.0),
    # padding and repetition earn nothing and dilute what is right
    (_c("1 + 1 = 2. 2 + 2 = 4. 4 + 4 = 8."), Q, 0.0),  # nothing from the question
    (_c("2 * 12 = 24. 24 * 60 = 1440."), Q, 0.0),  # constants only, then built on them
    (_c("160 * 30% = 48. 1 + 1 = 2. 1 + 1 = 2. 1 + 1 = 2."), Q, 0.25),
    (_c("160 * 30% = 48. 160 * 30% = 48. 160 * 30% = 48. 160 * 30% = 48."), Q, 0.25),
    (_c("160 - 48 = 112 " * 10), Q, 0.0),
    # no steps, no format: no credit
    (_c("He answers 70% of 160 emails, 5 days a week."), Q, 0.0),
    (_c("48=48 and 112 = 112"), Q, 0.0),  # no operator: not a step
    (_c(""), Q, 0.0),
    ("<reasoning>160 * 30% = 48</reasoning>", Q, 0.0),  # no answer block
    ("<reasoning>160 * 30% = 48</reasoning><answer> </answer>", Q, 0.0),  # empty answer
    ("160 * 30% = 48 <answer>560</answer>", Q, 0.0),  # no reasoning block
    (_c("160 * 30% = 48") + _c("160 * 30% = 48"), Q, 0.0),  # doubled blocks
    ("<reasoning>x</reasoning><answer>560</answer> 160 * 30% = 48", Q, 0.0),  # after
    # garbage and near misses
    (_c("10**10**10 = 5"), Q, 0.0),
    (_c("\u0661\u0666\u0660 * 30% = 48"), Q, 0.0),  # Arabic-Indic digits are not numbers here
    (_c("160 +\n30 = 190"), Q, 0.0),  # a line break ends an expression
    (_c("160 * 30% = = 48"), Q, 0.0),
    (_c("= 160 * 30 % ="), Q, 0.0),
    (_c("160 * 30% = 48" + "=" * 2000), Q, 1.0),
]


def test_table_is_large_enough():
    assert len(TABLE) >= 40


@pytest.mark.parametrize("completion,question,expected", TABLE)
def test_step_reward_table(completion, question, expected):
    (got,) = check_steps([completion], ["560"], questions=[question])
    assert got == pytest.approx(expected), arithmetic.count_steps(completion, question)


def test_steps_are_read_and_checked_exactly():
    (s,) = arithmetic.steps("So 0.1 + 0.2 = 0.3 exactly")
    assert [o.value for o in s.operands] == [Fraction(1, 10), Fraction(2, 10)]
    assert arithmetic.is_right(s)  # rational, not floating point
    (s,) = arithmetic.steps("1/3 * 3 = 1")
    assert arithmetic.is_right(s)
    (s,) = arithmetic.steps("1 / 3 = 0.33333333333333333")  # 17 decimals: rounds right
    assert arithmetic.is_right(s)
    assert arithmetic.steps("1" * 19 + " + 1 = 2") == []  # more than MAX_DIGITS: no number
    assert len(arithmetic.steps("+".join(["1"] * 17) + " = 17")) == 0  # > MAX_OPERANDS
    assert len(arithmetic.steps("+".join(["1"] * 16) + " = 16")) == 1


def test_gold_values_reached():
    gold = "He buys 28 x 4 = 112 bananas. Then 132 - 112 = 20 are left. 20 / 4 = 5 each."
    # the first and last gold results, right; 20 is stated but wrongly computed
    text = "So <<28*4=112>> bananas, 7 + 14 = 20 left, <<20/4=5>>."
    assert arithmetic.gold_values_reached(text, gold) == (2, 3, True)
    # the right numbers in the wrong steps: nothing reached
    assert arithmetic.gold_values_reached("<<28+4=32>> <<132-32=100>>", gold) == (0, 3, False)
    assert arithmetic.gold_values_reached("132 - 112 = 20", gold) == (1, 3, False)
    assert arithmetic.gold_values_reached("anything", "no steps here") == (0, 0, False)
    # a result repeated in the solution counts once
    assert arithmetic.gold_values_reached("2 * 3 = 6", "2 * 3 = 6 and 3 * 2 = 6") == (1, 1, True)


ADVERSARIAL = [
    "9" * 100_000 + " * 9 = 81",
    "999999999999999999*" * 5000 + "=1",
    "1+" * 50_000 + "=3",
    "=" * 100_000,
    "(1+2)" * 20_000,
    "1/0=1/0=0/0",
    "10**10**10",
    "\u0663 + \u0664 = \u0667 \u00b2 \u2153 \u00bd",
    "\x00\ufffd\ud7ff" * 1000,
    "-" * 50_000 + "1",
    "$" * 1000 + "%" * 1000,
    "1e308 * 1e308 = inf",
    "1,000,000,000,000,000,000,000 * 2 = 2",
]


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_never_raises_and_stays_fast(text):
    began = time.perf_counter()
    for completion in (text, _c(text), f"<reasoning>{text}"):
        (score,) = check_steps([completion], ["1"], questions=[text])
        assert 0.0 <= score <= 1.0
    arithmetic.count_steps(text, text)
    assert time.perf_counter() - began < 5.0


def test_never_raises_on_random_text():
    rng = random.Random(0)
    alphabet = "0123456789+-*/x×÷=.,%$ ()<>reasoninganswer/\n"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(200)))
             for _ in range(300)]
    scores = check_steps([_c(t) for t in texts], ["1"] * 300, questions=texts)
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_step_credit_and_question_plumbing():
    c = _c("160 * 30% = 48. 1 + 1 = 2.")
    cfg = rewards.RewardConfig(step_credit=4.0)
    assert check_steps([c], ["560"], questions=[Q], cfg=cfg) == [2.0]
    with pytest.raises(ValueError, match="questions"):
        score_completions([c], ["560"], rewards.RewardConfig(functions=(("check_steps", 1.0),)))
    total, per = score_completions([c], ["560"], rewards.RewardConfig(
        functions=(("check_steps", 3.0),)), questions=[Q])
    assert per["check_steps"].tolist() == [0.5] and total.tolist() == [1.5]
    with pytest.raises(ValueError, match="completions"):
        check_steps([c, c], ["560", "560"], questions=[Q])


def test_recipe_right_answer_beats_any_steps():
    """In the CPU recipe's weights, every right answer (no steps at all) outscores every
    wrong answer (all steps credited, any band of closeness), format alike."""
    cfg = presets.train_preset("cpu-270m").rewards
    assert ("check_steps", 2.0) in cfg.functions
    right = [_c("The emails add up.", "560"), _c("160 + 5 = 165", "560")]
    wrong = [_c("160 * 30% = 48. 160 - 48 = 112. 112 * 5 = 560. " * 3, a)
             for a in ("559", "600", "640", "1", "-560", "many")]
    r, _ = score_completions(right, ["560"] * len(right), cfg, [Q] * len(right))
    w, per = score_completions(wrong, ["560"] * len(wrong), cfg, [Q] * len(wrong))
    assert per["check_steps"].min() > 0
    assert r.min() > w.max(), (r, w)
