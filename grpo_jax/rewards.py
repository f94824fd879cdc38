"""Rule-based rewards for the reasoning format and the numeric answer.

Each reward function is `fn(completions, answers, *, cfg=RewardConfig()) -> list[float]`
(`questions=` too for a reward registered as reading them): pure, one score per
completion, and it never raises on any text (the model can write anything). Scores
live in `RewardConfig`; which functions run, and with which weights, is
`RewardConfig.functions`, resolved through a registry so new rewards plug in by name
(`register_reward`).

The expected completion is

    <reasoning> ... </reasoning>
    <answer> 42 </answer>
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Sequence

import numpy as np

from grpo_jax import arithmetic

TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Scores of the built-in rewards, and the weighted list of rewards to run."""

    functions: tuple[tuple[str, float], ...] = (
        ("match_format_exactly", 1.0),
        ("match_format_approximately", 1.0),
        ("check_answer", 1.0),
        ("check_numbers", 1.0),
    )
    """(registered reward name, weight) pairs; the total reward is the weighted sum.
    Registered: match_format_exactly, match_format_approximately, check_answer,
    check_numbers, and check_steps (the fraction of the arithmetic steps in the
    reasoning that are right and built from the question's numbers: it varies among
    wrong answers, where the answer rewards give a group no signal; weight it below
    check_answer's gap so a right answer always beats any steps)."""
    format_exact: float = 3.0
    """match_format_exactly: the whole completion is the reasoning block then the answer block."""
    tag_once: float = 0.5
    """match_format_approximately: added for each of the four tags that occurs exactly once."""
    tag_not_once: float = -0.5
    """match_format_approximately: added for each tag that is missing or repeated."""
    answer_exact: float = 3.0
    """check_answer: the answer equals the reference as a number."""
    answer_within_10pct: float = 0.5
    """check_answer: guess / reference within [0.9, 1.1]."""
    answer_within_20pct: float = 0.25
    """check_answer: guess / reference within [0.8, 1.2]."""
    answer_wrong: float = -1.0
    """check_answer: a number, but further off."""
    answer_unparsable: float = -0.5
    """check_answer: an <answer> block holding no single number."""
    answer_missing: float = 0.0
    """check_answer: no <answer>...</answer> block at all."""
    number_match: float = 1.5
    """check_numbers: the first number inside <answer> equals the reference."""
    step_credit: float = 1.0
    """check_steps: the score of a completion all of whose stated steps earn credit."""

    def __post_init__(self):
        if not self.functions:
            raise ValueError("RewardConfig.functions is empty: list at least one reward")
        for entry in self.functions:
            if (not isinstance(entry, tuple) or len(entry) != 2 or not isinstance(entry[0], str)
                    or not isinstance(entry[1], (int, float)) or not math.isfinite(entry[1])):
                raise ValueError(f"RewardConfig.functions entries must be (name, finite weight) "
                                 f"pairs, got {entry!r}")
        names = [n for n, _ in self.functions]
        if len(set(names)) != len(names):
            raise ValueError(f"RewardConfig.functions lists a reward twice: {names}")


DEFAULT_REWARD_CONFIG = RewardConfig()


# ---------------------------------------------------------------------------
# Parsing helpers

# The whole completion: optional whitespace, the reasoning block, optional
# whitespace, the answer block, optional whitespace, end. \A and \Z (not ^ and
# $ with MULTILINE) so text on a later line after </answer> does not pass.
_EXACT = re.compile(
    r"\A\s*<reasoning>(?P<reasoning>.*?)</reasoning>\s*<answer>(?P<answer>.*?)</answer>\s*\Z",
    re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

# A decimal number: optional sign, optional "$", digits grouped by thousands
# commas or plain, optional fraction. The look-behind keeps a match from
# starting inside a longer number or word ("v2", "1.2.3" second part).
_NUMBER = re.compile(
    r"(?<![\w.,])(?P<sign>[-+\u2212]?)(?:\$\s?)?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")


def all_numbers(text: str) -> list[float]:
    """Every number in `text`, thousands separators, "$" and "%" dropped."""
    out = []
    for m in _NUMBER.finditer(text):
        value = float(m.group("num").replace(",", ""))  # huge digit strings give inf, not raise
        out.append(-value if m.group("sign") in ("-", "\u2212") else value)
    return out


def parse_number(text: str) -> float | None:
    """The one number in `text` ("$1,234.50", "-7", "12%", "42 apples"); None when
    there is no number or more than one (an ambiguous answer is not a number)."""
    found = all_numbers(text)
    return found[0] if len(found) == 1 else None


def first_number(text: str) -> float | None:
    found = all_numbers(text)
    return found[0] if found else None


def exact_blocks(completion: str) -> re.Match | None:
    """The match of `completion` (groups "reasoning", "answer") when it is exactly one
    non-empty reasoning block then one non-empty answer block, else None."""
    m = _EXACT.match(completion)
    ok = (m is not None and m.group("reasoning").strip() != ""
          and m.group("answer").strip() != ""
          # a tag nested in a block ("<answer>1</answer><answer>2</answer>" parses as
          # one block by the lazy regex) means doubled tags, not the format
          and all(completion.count(t) == 1 for t in TAGS))
    return m if ok else None


def extract_answer(completion: str) -> str | None:
    """The text inside the first <answer>...</answer>, or None."""
    m = _ANSWER.search(completion)
    return None if m is None else m.group(1)


def check_lengths(completions: Sequence[str], answers: Sequence[str]) -> None:
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} reference answers: "
                         "each completion needs its reference")


def as_text(x) -> str:
    # Robust to None / bytes from a decoder: scored as text, never raising.
    if isinstance(x, str):
        return x
    if isinstance(x, bytes):
        return x.decode("utf-8", "replace")
    return "" if x is None else str(x)


# ---------------------------------------------------------------------------
# The four rewards


def match_format_exactly(completions: Sequence[str], answers: Sequence[str], *,
                         cfg: RewardConfig = DEFAULT_REWARD_CONFIG) -> list[float]:
    """cfg.format_exact when the completion is exactly one non-empty reasoning block then
    one non-empty answer block (whitespace around and between allowed), else 0."""
    check_lengths(completions, answers)
    return [cfg.format_exact if exact_blocks(c) else 0.0 for c in map(as_text, completions)]


def match_format_approximately(completions: Sequence[str], answers: Sequence[str], *,
                               cfg: RewardConfig = DEFAULT_REWARD_CONFIG) -> list[float]:
    """Per tag: cfg.tag_once if it occurs exactly once, else cfg.tag_not_once; summed."""
    check_lengths(completions, answers)
    return [float(sum(cfg.tag_once if c.count(t) == 1 else cfg.tag_not_once for t in TAGS))
            for c in map(as_text, completions)]


def check_answer(completions: Sequence[str], answers: Sequence[str], *,
                 cfg: RewardConfig = DEFAULT_REWARD_CONFIG) -> list[float]:
    """Grade the number inside the first <answer> block against the reference.

    Equal as numbers (or as stripped strings) -> answer_exact; else by ratio
    guess / reference: within 10% -> answer_within_10pct, 20% -> answer_within_20pct,
    otherwise answer_wrong. No single number in the block -> answer_unparsable;
    no block -> answer_missing.
    """
    check_lengths(completions, answers)
    scores = []
    for c, ref_text in zip(map(as_text, completions), map(as_text, answers)):
        inner = extract_answer(c)
        if inner is None:
            scores.append(cfg.answer_missing)
            continue
        if inner.strip() == ref_text.strip():
            scores.append(cfg.answer_exact)
            continue
        guess, ref = parse_number(inner), parse_number(ref_text)
        if guess is None:
            scores.append(cfg.answer_unparsable)
        elif ref is None:
            scores.append(cfg.answer_wrong)  # a non-numeric reference matches only as a string
        elif guess == ref:
            scores.append(cfg.answer_exact)
        elif ref == 0 or not math.isfinite(guess) or not math.isfinite(ref):
            scores.append(cfg.answer_wrong)  # no meaningful ratio
        else:
            ratio = guess / ref
            if 0.9 <= ratio <= 1.1:
                scores.append(cfg.answer_within_10pct)
            elif 0.8 <= ratio <= 1.2:
                scores.append(cfg.answer_within_20pct)
            else:
                scores.append(cfg.answer_wrong)
    return scores


def check_numbers(completions: Sequence[str], answers: Sequence[str], *,
                  cfg: RewardConfig = DEFAULT_REWARD_CONFIG) -> list[float]:
    """cfg.number_match if the first number inside <answer> equals the reference's
    (first) number, else 0."""
    check_lengths(completions, answers)
    scores = []
    for c, ref_text in zip(map(as_text, completions), map(as_text, answers)):
        inner = extract_answer(c)
        guess = None if inner is None else first_number(inner)
        ref = first_number(ref_text)
        scores.append(cfg.number_match if guess is not None and guess == ref else 0.0)
    return scores


def check_steps(completions: Sequence[str], answers: Sequence[str], *,
                questions: Sequence[str], cfg: RewardConfig = DEFAULT_REWARD_CONFIG
                ) -> list[float]:
    """cfg.step_credit x the fraction of the arithmetic steps (`a op b = c`, chains, see
    `grpo_jax.arithmetic`) in the reasoning block that earn credit: right in exact
    arithmetic, not a repeat, and with every operand from the question, an earlier
    step's result or a conventional constant (100, 12, 60, ...), not constants alone.
    0 unless the completion is in the exact format (`exact_blocks`), and 0 without
    steps. Why: the answer rewards are equal across wrong answers, so a group
    of wrong answers gives no signal; right arithmetic varies among them. Padding
    with `1 + 1 = 2` or a repeated step lowers the fraction instead of raising it."""
    check_lengths(completions, answers)
    check_lengths(completions, questions)
    scores = []
    for c, q in zip(map(as_text, completions), map(as_text, questions)):
        m = exact_blocks(c)
        if m is None:
            scores.append(0.0)
            continue
        counts = arithmetic.count_steps(m.group("reasoning"), q)
        scores.append(cfg.step_credit * counts.credited / counts.stated if counts.stated
                      else 0.0)
    return scores


# ---------------------------------------------------------------------------
# Registry and scoring

RewardFn = Callable[..., list]

_REGISTRY: dict[str, RewardFn] = {}
# Built-ins read their scores from the config; plugged-in rewards may not take one.
_TAKES_CFG: set[str] = set()
# Rewards that read each completion's question (keyword `questions`).
_TAKES_QUESTIONS: set[str] = set()


def register_reward(name: str, fn: RewardFn, *, takes_cfg: bool = False,
                    takes_questions: bool = False) -> None:
    """Make `fn(completions, answers[, questions=...][, cfg=...]) -> list[float]`
    available by name."""
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable")
    _REGISTRY[name] = fn
    (_TAKES_CFG.add if takes_cfg else _TAKES_CFG.discard)(name)
    (_TAKES_QUESTIONS.add if takes_questions else _TAKES_QUESTIONS.discard)(name)


for _fn in (match_format_exactly, match_format_approximately, check_answer, check_numbers):
    register_reward(_fn.__name__, _fn, takes_cfg=True)
register_reward("check_steps", check_steps, takes_cfg=True, takes_questions=True)


def reward_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def check_rewards(cfg: RewardConfig) -> None:
    """Every reward the config names is registered (checked before a run's first step)."""
    unknown = [name for name, _ in cfg.functions if name not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown reward {', '.join(map(repr, unknown))} in "
                         f"--rewards.functions; registered: {', '.join(_REGISTRY)}")


def score_completions(completions: Sequence[str], answers: Sequence[str],
                      cfg: RewardConfig = DEFAULT_REWARD_CONFIG,
                      questions: Sequence[str] | None = None
                      ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Total weighted reward [N] and each function's unweighted rewards [N], float64.
    `questions` (one per completion) is required when a configured reward reads them."""
    check_lengths(completions, answers)
    n = len(completions)
    total = np.zeros(n, np.float64)
    per_function: dict[str, np.ndarray] = {}
    check_rewards(cfg)
    for name, weight in cfg.functions:
        fn = _REGISTRY[name]
        kwargs = {"cfg": cfg} if name in _TAKES_CFG else {}
        if name in _TAKES_QUESTIONS:
            if questions is None:
                raise ValueError(f"reward {name!r} reads the questions: pass questions=")
            kwargs["questions"] = questions
        out = fn(completions, answers, **kwargs)
        values = np.asarray(out, np.float64).reshape(-1)
        if values.shape != (n,):
            raise ValueError(f"reward {name!r} returned {values.size} scores for {n} completions")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"reward {name!r} returned non-finite scores at rows "
                             f"{np.flatnonzero(~np.isfinite(values)).tolist()}")
        per_function[name] = values
        total += weight * values
    return total, per_function
