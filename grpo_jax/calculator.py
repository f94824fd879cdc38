"""The calculator tool: exact arithmetic on the text of a call, parsed (never `eval`).

    expr   := term (('+' | '-') term)*
    term   := unary (('*' | '/') unary)*          'x', '×', '÷' are accepted too
    unary  := '-' unary | '+' unary | atom '%'*   a postfix % divides by 100 (30% = 3/10)
    atom   := number | '(' expr ')'
    number := digits with optional thousands commas and one decimal point; a leading
              currency sign ($ € £) is ignored

Values are `fractions.Fraction`s, so `0.1 + 0.2` is 0.3 and `10 / 4 * 4` is 10. Sizes
are bounded so a call cannot hang the sampler: at most MAX_CHARS characters,
MAX_DIGITS digits a number, MAX_DEPTH nested parentheses / unary signs, and results
whose numerator or denominator exceed MAX_RESULT_DIGITS digits are refused.

One result format (`format_value`): an integer as an integer (`112`, `-3`); otherwise
a decimal with at most DECIMALS places, rounded half away from zero, trailing zeros
dropped (`1.1`, `3.333333`). A malformed call, a division by zero or a bound raises
`CalculatorError`, whose message the tool protocol writes back as the result.
"""
from __future__ import annotations

import re
from fractions import Fraction

MAX_CHARS = 200
MAX_DIGITS = 18
MAX_DEPTH = 16
MAX_RESULT_DIGITS = 60
DECIMALS = 6


class CalculatorError(ValueError):
    pass


_TOKEN = re.compile(r"\s*(?:(?P<num>[0-9][0-9,]*(?:\.[0-9]+)?|\.[0-9]+)|(?P<op>[-+*/()%x×÷])"
                    r"|(?P<cur>[$€£]))")
_OPS = {"x": "*", "×": "*", "÷": "/"}


def _tokens(text: str) -> list[tuple[str, object]]:
    if len(text) > MAX_CHARS:
        raise CalculatorError(f"expression longer than {MAX_CHARS} characters")
    out, at = [], 0
    text = text.rstrip()
    while at < len(text):
        m = _TOKEN.match(text, at)
        if m is None:
            raise CalculatorError(f"unexpected {text[at:].strip()[:1]!r}")
        at = m.end()
        if m.group("num") is not None:
            out.append(("num", _number(m.group("num"))))
        elif m.group("op") is not None:
            op = m.group("op")
            out.append(("op", _OPS.get(op, op)))
    if not out:
        raise CalculatorError("empty expression")
    return out


def _number(text: str) -> Fraction:
    whole = text.split(".", 1)[0]
    if "," in whole and not re.fullmatch(r"[0-9]{1,3}(,[0-9]{3})+", whole):
        raise CalculatorError(f"malformed number {text!r}")
    digits = text.replace(",", "")
    if sum(c.isdigit() for c in digits) > MAX_DIGITS:
        raise CalculatorError(f"number longer than {MAX_DIGITS} digits")
    return Fraction(digits)


class _Parser:
    def __init__(self, tokens):
        self.tokens, self.at, self.depth = tokens, 0, 0

    def peek(self):
        return self.tokens[self.at] if self.at < len(self.tokens) else ("end", None)

    def take(self):
        token = self.peek()
        self.at += 1
        return token

    def expr(self) -> Fraction:
        return self._chain(("+", "-"), self.term)

    def term(self) -> Fraction:
        return self._chain(("*", "/"), self.unary)

    def _chain(self, ops, operand) -> Fraction:
        """operand (op operand)* for ops of one precedence, left to right."""
        value = operand()
        while self.peek()[0] == "op" and self.peek()[1] in ops:
            op, right = self.take()[1], operand()
            if op == "/" and right == 0:
                raise CalculatorError("division by zero")
            value = {"+": value.__add__, "-": value.__sub__, "*": value.__mul__,
                     "/": value.__truediv__}[op](right)
            _check_size(value)
        return value

    def unary(self) -> Fraction:
        kind, value = self.peek()
        if (kind, value) in (("op", "-"), ("op", "+")):
            self.take()
            with self._nested():
                inner = self.unary()
            return -inner if value == "-" else inner
        result = self.atom()
        while self.peek() == ("op", "%"):
            self.take()
            result = result / 100
        return result

    def atom(self) -> Fraction:
        kind, value = self.take()
        if kind == "num":
            return value
        if (kind, value) == ("op", "("):
            with self._nested():
                inner = self.expr()
            if self.take() != ("op", ")"):
                raise CalculatorError("unbalanced parentheses")
            return inner
        raise CalculatorError("expected a number" if kind == "end" else
                              f"unexpected {value!r}")

    def _nested(self):
        parser = self

        class Level:
            def __enter__(self):
                parser.depth += 1
                if parser.depth > MAX_DEPTH:
                    raise CalculatorError(f"nested deeper than {MAX_DEPTH}")

            def __exit__(self, *exc):
                parser.depth -= 1

        return Level()


def _check_size(value: Fraction) -> None:
    if max(abs(value.numerator), value.denominator) >= 10 ** MAX_RESULT_DIGITS:
        raise CalculatorError(f"result beyond {MAX_RESULT_DIGITS} digits")


def evaluate(text: str) -> Fraction:
    """The exact value of an arithmetic expression (see the module docstring)."""
    parser = _Parser(_tokens(text))
    value = parser.expr()
    if parser.peek()[0] != "end":
        raise CalculatorError(f"unexpected {parser.peek()[1]!r}")
    _check_size(value)
    return value


def format_value(value: Fraction) -> str:
    """The one result format: `112`, `-3`, `1.1`, `3.333333` (DECIMALS places at most,
    half away from zero)."""
    if value.denominator == 1:
        return str(value.numerator)
    scaled = abs(value) * 10 ** DECIMALS
    rounded = int(scaled + Fraction(1, 2))  # half away from zero (on the magnitude)
    whole, frac = divmod(rounded, 10 ** DECIMALS)
    sign = "-" if value < 0 and rounded else ""
    text = f"{whole}.{frac:0{DECIMALS}d}".rstrip("0").rstrip(".")
    return sign + text


def calculator(call: str) -> str:
    """The tool: the text of a call (`28*4`) -> the text of its result (`112`)."""
    return format_value(evaluate(call))
