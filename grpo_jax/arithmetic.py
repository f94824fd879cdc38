"""The arithmetic a worked solution states, read and checked exactly.

A *step* is an expression of two or more numbers joined by + - * x × / ÷, then "=" and
the number it claims: `160 - 48 = 112`, `3 + 8 + 18 = 29`, `96 plants × $3 = $288`
(up to three words of units may follow a number), `160 * 30% = 48` (30% is 3/10).
A chain that runs on from its result (`5 + 3 = 8 + 2 = 10`) is two steps. Values are
`fractions.Fraction`s: a step is right when its expression, with * and / before + and -,
equals the stated result exactly, or when the result is written with d decimals and
is the exact value rounded to d decimals (`10 / 3 = 3.33`). A division by zero is a
wrong step, not an error.

Reading never raises and stays linear in the text (of which the first MAX_CHARS
characters are read): only ASCII digits make numbers
(never other scripts' digits), a number has at most `MAX_DIGITS` digits (a longer run
of digits is no number, so no step), a step at most `MAX_OPERANDS` operands, and at
most `MAX_STEPS` steps are read.
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import NamedTuple, Sequence

MAX_CHARS = 20_000  # read of any text: far beyond a completion or a question
MAX_DIGITS = 18
MAX_STEPS = 256
MAX_OPERANDS = 16
MAX_UNIT_WORDS = 3

# Numbers a solution may bring in without the question stating them: half/double,
# per cent, dozen, days of a week, months, hours, minutes, and the like.
CONVENTIONAL = frozenset(map(Fraction, (2, 3, 4, 7, 10, 12, 24, 52, 60, 100, 365, 1000)))

_WORD_NUMBERS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "hundred": 100, "thousand": 1000,
    "half": 2, "twice": 2, "double": 2, "triple": 3, "thrice": 3, "quarter": 4, "dozen": 12,
}

# One token at a time: a number (optional currency sign, thousands commas, decimals,
# optional %), an operator, "=", a word, or anything else (which ends an expression).
_TOKEN = re.compile(
    r"(?P<num>(?:[$€£] ?)?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?(?![0-9]) ?%?)"
    r"|(?P<op>[+*×÷/\-−–·])"
    r"|(?P<eq>=)"
    r"|(?P<word>[A-Za-z][A-Za-z']*)"
    r"|(?P<space>[ \t]+)"
    r"|(?P<other>.)", re.DOTALL)

_OPS = {"+": "+", "-": "-", "−": "-", "–": "-", "*": "*", "×": "*", "x": "*", "·": "*",
        "/": "/", "÷": "/"}


class Number(NamedTuple):
    value: Fraction     # what the text means (30% -> 3/10)
    written: Fraction   # the digits as written (30% -> 30)
    decimals: int       # digits after the point as written


class Step(NamedTuple):
    operands: tuple[Number, ...]
    ops: tuple[str, ...]   # len(operands) - 1 of "+", "-", "*", "/"
    result: Number

    @property
    def key(self) -> tuple:
        return (tuple(o.value for o in self.operands), self.ops, self.result.value)


def parse_number(text: str) -> Number | None:
    """A number token's value, or None when it has more than MAX_DIGITS digits."""
    digits = re.sub(r"[^0-9.]", "", text)
    if sum(c.isdigit() for c in digits) > MAX_DIGITS:
        return None
    written = Fraction(digits)
    decimals = len(digits.split(".", 1)[1]) if "." in digits else 0
    return Number(written / 100 if text.rstrip().endswith("%") else written, written, decimals)


def _tokens(text: str) -> list[tuple[str, object]]:
    """(kind, value) tokens; spaces dropped; words kept (units between numbers)."""
    out = []
    for m in _TOKEN.finditer(text[:MAX_CHARS]):
        kind = m.lastgroup
        s = m.group()
        if kind == "space":
            continue
        if kind == "num":
            n = parse_number(s)
            out.append(("num", n) if n is not None else ("other", s))
        elif kind == "op":
            out.append(("op", _OPS[s]))
        elif kind == "word" and s in ("x", "X"):
            out.append(("op", "*"))
        else:
            out.append((kind, s))
    return out


def steps(text: str) -> list[Step]:
    """Every step `text` states, in order (at most MAX_STEPS)."""
    toks = _tokens(text)
    n, found, i = len(toks), [], 0

    def skip_units(j: int) -> int:
        k = j
        while k < n and k - j < MAX_UNIT_WORDS and toks[k][0] == "word":
            k += 1
        return k

    while i < n and len(found) < MAX_STEPS:
        if toks[i][0] != "num":
            i += 1
            continue
        operands, ops, j = [toks[i][1]], [], skip_units(i + 1)
        while j + 1 < n and toks[j][0] == "op" and toks[j + 1][0] == "num":
            ops.append(toks[j][1])
            operands.append(toks[j + 1][1])
            j = skip_units(j + 2)
        result = _result_at(toks, j) if ops and len(operands) <= MAX_OPERANDS else None
        if result is not None:
            found.append(Step(tuple(operands), tuple(ops), result[0]))
            i = result[1]  # the result may open the next step of a running chain
        else:
            i = j if ops else i + 1  # an expression without a result: read on after it
    return found


def _result_at(toks, j: int) -> tuple[Number, int] | None:
    """The "= N" (or "= -N") at token j: (N, the index of its token), else None."""
    if j + 1 < len(toks) and toks[j][0] == "eq":
        if toks[j + 1][0] == "num":
            return toks[j + 1][1], j + 1
        if j + 2 < len(toks) and toks[j + 1] == ("op", "-") and toks[j + 2][0] == "num":
            n = toks[j + 2][1]
            return Number(-n.value, -n.written, n.decimals), j + 2
    return None


def evaluate(operands: Sequence[Fraction], ops: Sequence[str]) -> Fraction | None:
    """The expression's exact value, * and / before + and -; None on division by zero."""
    terms, signs = [], []
    term = operands[0]
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            term = term * x
        elif op == "/":
            if x == 0:
                return None
            term = term / x
        else:
            terms.append(term)
            signs.append(op)
            term = x
    terms.append(term)
    total = terms[0]
    for sign, t in zip(signs, terms[1:]):
        total = total + t if sign == "+" else total - t
    return total


def is_right(step: Step) -> bool:
    """The expression equals the stated result, exactly or rounded to its decimals."""
    value = evaluate([o.value for o in step.operands], step.ops)
    if value is None:
        return False
    if value == step.result.value:
        return True
    d = step.result.decimals
    return d > 0 and abs(value - step.result.value) * 2 * 10 ** d <= 1


def question_numbers(question: str) -> set[Fraction]:
    """The values a question states: its numbers (30% as 30 and 3/10, and its complement
    70 and 7/10; the parts of 1/2 as 1, 2 and 1/2) and its number words ("three",
    "half", "dozen")."""
    known: set[Fraction] = set()
    toks = _tokens(question)
    for k, (kind, value) in enumerate(toks):
        if kind == "num":
            known.update((value.value, value.written))
            if value.value != value.written:  # a percentage: its complement too (70% of 30%)
                known.update((1 - value.value, 100 - value.written))
            if k + 2 < len(toks) and toks[k + 1] == ("op", "/") and toks[k + 2][0] == "num" \
                    and toks[k + 2][1].value != 0:
                known.add(value.value / toks[k + 2][1].value)
        elif kind == "word" and value.lower() in _WORD_NUMBERS:
            known.add(Fraction(_WORD_NUMBERS[value.lower()]))
    return known


class StepCounts(NamedTuple):
    stated: int     # steps the text states
    right: int      # of those, arithmetically right
    credited: int   # right, grounded and not a repeat (the reward's numerator)


def count_steps(text: str, question: str = "") -> StepCounts:
    """How many steps `text` states, how many are right, and how many earn credit: right,
    not a repeat of an earlier step, and *grounded*: every operand is a number the
    question states, an earlier grounded step's result or a CONVENTIONAL constant, and
    at least one is not a constant (so `1 + 1 = 2`, `2 * 12 = 24` and whatever builds
    on them earn nothing)."""
    known = question_numbers(question)
    seen: set[tuple] = set()
    stated = right = credited = 0
    for step in steps(text):
        stated += 1
        ok = is_right(step)
        right += ok
        sources = [o.value in known or o.written in known for o in step.operands]
        grounded = any(sources) and all(
            s or o.value in CONVENTIONAL for s, o in zip(sources, step.operands))
        credited += ok and grounded and step.key not in seen
        seen.add(step.key)
        if grounded:  # an ungrounded step's result grounds nothing after it
            known.add(step.result.value)
    return StepCounts(stated, right, credited)


def gold_values_reached(text: str, solution: str) -> tuple[int, int, bool]:
    """How far `text` follows a worked `solution`: (distinct results of the solution's
    steps that `text` computes with a right step, how many distinct results the
    solution has, whether the solution's first step is among them). With every
    stated step right (a calculator), this separates choosing the operations from
    carrying them out."""
    gold = [s.result.value for s in steps(solution)]
    if not gold:
        return 0, 0, False
    computed = {s.result.value for s in steps(text) if is_right(s)}
    return len(set(gold) & computed), len(set(gold)), gold[0] in computed
