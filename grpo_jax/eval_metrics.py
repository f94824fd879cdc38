"""Held-out evaluation figures: four booleans per completion, their accuracies, a table.

    format   the completion is exactly <reasoning>...</reasoning><answer>...</answer>
             (`rewards.match_format_exactly` > 0)
    exact    the first number inside <answer> equals the reference number
    partial  that number / reference within [0.9, 1.1] (reference 0: exact only)
    lenient  ignoring the format, the last number anywhere equals the reference
             (like lm-eval-harness's flexible extract: "$1,234." reads as 1234)

`partial` includes `exact`; `lenient` measures arithmetic apart from format-following,
so base and trained models can be compared even when the base model ignores the tags.
Beside them, `step_accuracy`: of all the arithmetic steps the completions state
(`a op b = c`, `grpo_jax.arithmetic`), the fraction that are right, pooled over the
problems; its interval treats steps as independent draws, which they are not
quite (one answer's steps share its mistakes), so it is narrower than it should be.
Parsing is `grpo_jax.rewards`'s, so evaluation and training rewards read numbers alike.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from grpo_jax import arithmetic
from grpo_jax.rewards import (all_numbers, as_text, check_lengths, extract_answer, first_number,
                              match_format_exactly)

FIGURES = ("format", "exact", "partial", "lenient")

# summary key -> table row label
_ROWS = (("format_accuracy", "format"), ("exact_accuracy", "exact"),
         ("partial_accuracy", "partial (within 10%)"), ("lenient_accuracy", "lenient (last number)"),
         ("step_accuracy", "arithmetic steps right"))


def _within_10pct(guess: float, ref: float) -> bool:
    if guess == ref:
        return True
    if ref == 0 or not math.isfinite(guess) or not math.isfinite(ref):
        return False  # no meaningful ratio
    return 0.9 <= guess / ref <= 1.1


def eval_scores(completions: Sequence[str], answers: Sequence[str]) -> dict[str, list[bool]]:
    """Per completion: {"format", "exact", "partial", "lenient"} -> list of bools.

    A reference with no number matches nothing (the data loader only yields numeric
    answers; this keeps a stray row from aborting an evaluation after generation).
    """
    check_lengths(completions, answers)
    completions = [as_text(c) for c in completions]
    fmt = [s > 0 for s in match_format_exactly(completions, ["" for _ in completions])]
    exact, partial, lenient = [], [], []
    for c, ref_text in zip(completions, map(as_text, answers)):
        ref = first_number(ref_text)
        inner = extract_answer(c)
        guess = None if inner is None else first_number(inner)
        ok = ref is not None and guess is not None
        exact.append(ok and guess == ref)
        partial.append(ok and _within_10pct(guess, ref))
        found = all_numbers(c)
        lenient.append(ref is not None and bool(found) and found[-1] == ref)
    return {"format": fmt, "exact": exact, "partial": partial, "lenient": lenient}


def step_counts(completions: Sequence[str]) -> list[arithmetic.StepCounts]:
    """Per completion: the arithmetic steps it states and how many are right."""
    return [arithmetic.count_steps(as_text(c)) for c in completions]


def summarize(scores: Mapping[str, Sequence[bool]],
              steps: Sequence[arithmetic.StepCounts] | None = None) -> dict[str, float]:
    """eval_scores output -> {"<figure>_accuracy": fraction in [0, 1], "num_problems": n};
    with `steps` (step_counts output) also step_accuracy, its interval and the count
    of steps stated (step_accuracy is absent when no completion states a step)."""
    missing = [f for f in FIGURES if f not in scores]
    if missing:
        raise ValueError(f"scores lack {missing}; expected the keys of eval_scores: {FIGURES}")
    n = len(scores[FIGURES[0]])
    if any(len(scores[f]) != n for f in FIGURES):
        raise ValueError(f"score lists differ in length: "
                         f"{ {f: len(scores[f]) for f in FIGURES} }")
    if n == 0:
        raise ValueError("no completions to summarize")
    out: dict = {f"{f}_accuracy": sum(map(bool, scores[f])) / n for f in FIGURES}
    out.update({f"{f}_ci95": list(wilson_interval(sum(map(bool, scores[f])), n))
                for f in FIGURES})
    out["num_problems"] = n
    if steps is not None:
        if len(steps) != n:
            raise ValueError(f"{len(steps)} step counts for {n} completions")
        stated, right = sum(c.stated for c in steps), sum(c.right for c in steps)
        out["steps_stated"] = stated
        if stated:
            out["step_accuracy"] = right / stated
            out["step_ci95"] = list(wilson_interval(right, stated))
    return out


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for the default z):
    unlike the normal approximation it stays inside [0, 1] and is sensible at 0/n."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes}/{n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """{model label: summarize(...)} -> Markdown table, a column per model, a row per figure.

    Accuracies as percentages with one decimal, with their 95% Wilson interval in
    brackets when the results carry it; a figure a model lacks shows as "-".
    """
    if not results:
        raise ValueError("format_table needs at least one model's results")
    labels = list(results)
    lines = ["| metric | " + " | ".join(labels) + " |",
             "|---|" + "---:|" * len(labels)]
    for key, name in _ROWS:
        if key == "step_accuracy" and not any(key in r for r in results.values()):
            continue  # files written before the figure existed
        cells = []
        for label in labels:
            v = results[label].get(key)
            ci = results[label].get(key.replace("_accuracy", "_ci95"))
            cell = "-" if v is None else f"{100 * float(v):.1f}%"
            if v is not None and ci is not None:
                cell += f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if any("num_problems" in r for r in results.values()):
        cells = [str(int(r["num_problems"])) if "num_problems" in r else "-"
                 for r in results.values()]
        lines.append("| problems | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mcnemar(before: Sequence[bool], after: Sequence[bool]) -> dict:
    """Paired comparison of one figure on the same problems: how many only `after`
    gets right, how many only `before`, and McNemar's exact two-sided p-value (a
    binomial test of the discordant pairs at 1/2; 1.0 when there are none)."""
    if len(before) != len(after):
        raise ValueError(f"paired figures need the same problems: {len(before)} vs {len(after)}")
    gained = sum(bool(b) and not bool(a) for a, b in zip(before, after))
    lost = sum(bool(a) and not bool(b) for a, b in zip(before, after))
    n = gained + lost
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2 ** n if n else 0.5
    return {"gained": gained, "lost": lost, "p": min(1.0, 2 * tail)}


def step_accuracy_difference(before: Sequence[arithmetic.StepCounts],
                             after: Sequence[arithmetic.StepCounts], *,
                             resamples: int = 10_000, seed: int = 0) -> dict:
    """after's pooled step accuracy minus before's on the same problems, with a 95%
    interval and a one-sided p-value (the share of resamples with no gain) from a
    paired bootstrap over problems: one answer's steps share its mistakes, so problems,
    not steps, are the independent draws."""
    import numpy as np
    if len(before) != len(after) or not before:
        raise ValueError(f"paired step counts need the same problems: {len(before)} vs "
                         f"{len(after)}")
    counts = np.asarray([[b.right, b.stated, a.right, a.stated] for b, a in zip(before, after)],
                        np.float64)
    if not counts[:, 1].sum() or not counts[:, 3].sum():
        raise ValueError("a column states no arithmetic steps: no step accuracy to compare")

    def difference(rows: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return rows[..., 2].sum(-1) / rows[..., 3].sum(-1) - \
                rows[..., 0].sum(-1) / rows[..., 1].sum(-1)

    draws = np.random.default_rng(seed).integers(0, len(counts), (resamples, len(counts)))
    boot = difference(counts[draws])
    boot = boot[np.isfinite(boot)]
    return {"difference": float(difference(counts)),
            "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
            "p_no_gain": float(np.mean(boot <= 0))}


def compare_columns(records: Mapping[str, Sequence[Mapping]], before: str = "sft",
                    after: str = "trained") -> dict | None:
    """exact (McNemar) and step accuracy (paired bootstrap) of `after` against `before`
    from an evaluation file's per-problem records; None unless both columns hold the
    same problems."""
    a, b = records.get(before), records.get(after)
    if not a or not b or [r["index"] for r in a] != [r["index"] for r in b]:
        return None
    out = {"exact": mcnemar([r["exact"] for r in a], [r["exact"] for r in b])}
    if all("steps_stated" in r for r in (*a, *b)):
        def counts(rows):
            return [arithmetic.StepCounts(r["steps_stated"], r["steps_right"], 0) for r in rows]
        try:
            out["step_accuracy"] = step_accuracy_difference(counts(a), counts(b))
        except ValueError:
            pass  # a column without steps: nothing to compare
    return out


def format_comparison(comparison: Mapping, before: str, after: str) -> str:
    """One line per figure of compare_columns' result."""
    e = comparison["exact"]
    lines = [f"{after} vs {before}, same problems: exact {e['gained']} gained, {e['lost']} "
             f"lost (McNemar p = {e['p']:.3g})"]
    s = comparison.get("step_accuracy")
    if s:
        lines.append(f"{after} vs {before}: step accuracy {100 * s['difference']:+.1f} points "
                     f"({100 * s['ci95'][0]:+.1f} to {100 * s['ci95'][1]:+.1f}, paired "
                     f"bootstrap over problems; p(no gain) = {s['p_no_gain']:.3g})")
    return "\n".join(lines)
