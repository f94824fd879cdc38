"""Math word problems: GSM8K (hub or local files) and reasoning-gym's gsm_symbolic,
the prompt template, and a deterministic, resumable training order.

Every problem is a `Problem(question, answer, index)`: `answer` is the reference
number as a string ("1234", "-3.5"), `index` the row it came from, so a report
can point back at the source. The training order is a pure function of
(shuffle seed, position): a checkpoint stores the position and nothing else.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np

from grpo_jax.config import DataConfig
from grpo_jax.tokenizer import chat_prompt

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are given a problem. Think about the problem and provide your working out. "
    "Place it between <reasoning> and </reasoning>. Then, provide your final answer "
    "between <answer> and </answer>. The answer is a single number.")

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    pass


class Problem(NamedTuple):
    question: str
    answer: str
    index: int
    # The worked solution before GSM8K's '#### N' line (the SFT target's reasoning),
    # when the row has one.
    solution: str | None = None
    # gsm_symbolic: the generator (template) the problem was drawn from.
    template: int | None = None


# gsm_symbolic templates (reasoning-gym generator indices) kept out of training, SFT
# and GRPO alike, for evaluation on templates never seen: every fifth of the 85
# generators reasoning-gym 0.1.19 offers (tasks_ok), 17 in all. Fixed here, not
# derived, so the evaluation set is the same on every machine.
HELD_OUT_TEMPLATES = frozenset({0, 5, 10, 15, 20, 25, 30, 38, 43, 48, 53, 58, 66, 71, 80,
                                85, 93})


def format_prompt(question: str, style: str = "chat", prefill: str = "") -> str:
    """The instruction and the question, ending where the model's answer begins, with
    `prefill` already written there. chat: one Gemma user turn (Gemma has no system
    role); plain: plain text, for base models."""
    if style == "chat":
        text = chat_prompt(f"{SYSTEM_PROMPT}\n\n{question.strip()}")
    elif style == "plain":
        text = f"{SYSTEM_PROMPT}\n\nProblem: {question.strip()}\n\nSolution:\n"
    else:
        raise ValueError(f"unknown prompt style {style!r}")
    return text + prefill


def encode_prompts(tokenizer, problems: Sequence[Problem], style: str = "chat",
                   prefill: str = "", max_tokens: int | None = None) -> list[list[int]]:
    """BOS + ids of each problem's formatted prompt. max_tokens: a longer prompt keeps
    its BOS and its last max_tokens - 1 ids (cut on the left, where the instruction
    is: the end, where the answer begins, stays)."""
    prompts = [tokenizer.encode(format_prompt(p.question, style, prefill)) for p in problems]
    if max_tokens is None:
        return prompts
    return [ids if len(ids) <= max_tokens else ids[:1] + ids[len(ids) - max_tokens + 1:]
            for ids in prompts]


def run_prompts(tokenizer, problems: Sequence[Problem], cfg: DataConfig) -> list[list[int]]:
    """`encode_prompts` as a run's data config sets it (style, prefill, length cut)."""
    return encode_prompts(tokenizer, problems, cfg.prompt_style, cfg.prefill,
                          cfg.max_prompt_tokens)


_NUMBER = re.compile(r"^[-+]?\d+(\.\d+)?$")


def gsm8k_answer(text: str) -> str:
    """The reference number after GSM8K's '####' ("#### 1,234" -> "1234")."""
    if "####" not in text:
        raise DataError("answer has no '#### N' line")
    value = text.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "")
    if not _NUMBER.match(value):
        raise DataError(f"answer after '####' is not a number: {value[:40]!r}")
    return value


def problems_from_rows(rows: Iterable[Any], source: str, on_malformed: str = "skip",
                       need_solution: bool = False) -> list[Problem]:
    """GSM8K-style rows ({"question": str, "answer": "... #### N"}) -> problems.

    A malformed row is reported with its index and skipped, or (on_malformed="error")
    refused; it is never used. With `need_solution` (SFT trains on it) a row whose
    answer has no worked solution before '#### N' is malformed too.
    """
    problems, skipped = [], []
    for index, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise DataError(f"expected an object, got {type(row).__name__}")
            question, answer = row.get("question"), row.get("answer")
            if not isinstance(question, str) or not question.strip():
                raise DataError("missing or empty 'question'")
            if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
                raise DataError("missing 'answer'")
            worked = isinstance(answer, str) and "####" in answer
            value = gsm8k_answer(answer) if worked else _plain_number(answer)
            solution = answer.rsplit("####", 1)[0].strip() if worked else ""
            if need_solution and not solution:
                raise DataError("no worked solution before '#### N' (SFT needs one)")
            problems.append(Problem(question, value, index, solution or None,
                                    row.get("template")))
        except DataError as e:
            if on_malformed == "error":
                raise DataError(f"{source}: row {index}: {e}") from None
            skipped.append(index)
            log.warning("%s: skipping malformed row %d: %s", source, index, e)
    if skipped:
        log.warning("%s: skipped %d malformed row(s): %s", source, len(skipped), skipped[:20])
    if not problems:
        raise DataError(f"{source}: no usable problems")
    return problems


def _plain_number(answer: Any) -> str:
    value = str(answer).strip().replace(",", "")
    if not _NUMBER.match(value):
        raise DataError(f"answer is neither '... #### N' nor a number: {str(answer)[:40]!r}")
    return value


def read_local_rows(path: str | Path) -> list[Any]:
    """Rows of a .jsonl, .json (a list) or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # here: only parquet files need it (through datasets)

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        return rows
    if suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append(f"<line {lineno}: not valid JSON>")  # reported as malformed
        return rows
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {LOCAL_SUFFIXES}")


# What HELD_OUT_TEMPLATES and every recorded figure were made with: a digest of what
# reasoning-gym's gsm_symbolic generates (`gsm_symbolic_fingerprint`). 0.1.19 and
# 0.1.25 give this one; a version whose generators, template list or draws differ
# would silently change the evaluation set, so it is refused.
GSM_SYMBOLIC_FINGERPRINT = "a8161052a6207ffb"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def gsm_symbolic_fingerprint() -> str:
    """sha256 (16 hex digits) over the installed gsm_symbolic's template list, one
    problem from every generator at a fixed seed, and the first 64 problems of stream 3
    (which template each draws included): a change to any of them changes it."""
    import random

    import reasoning_gym

    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=64, seed=3)
    module = sys.modules[type(dataset).__module__]
    digest = hashlib.sha256(json.dumps(list(getattr(module, "tasks_ok", ()))).encode())
    for t in sorted(dataset.generators):
        x = dataset.generators[t](random.Random(1000 + t), 1.0)
        digest.update(json.dumps([t, x["question"], str(x["answer"]),
                                  x["metadata"].get("answer_cot")]).encode())
    for i in range(len(dataset)):
        x = dataset[i]
        digest.update(json.dumps([dataset.task_indices[i], x["question"],
                                  str(x["answer"])]).encode())
    return digest.hexdigest()[:16]


def check_gsm_symbolic() -> None:
    """Refuse, in one line, a reasoning-gym whose gsm_symbolic differs from the one the
    held-out templates and recorded results were fixed against."""
    found = gsm_symbolic_fingerprint()
    if found != GSM_SYMBOLIC_FINGERPRINT:
        raise DataError(
            f"reasoning-gym {_version('reasoning-gym')}'s gsm_symbolic generates other "
            f"problems (fingerprint {found}, expected {GSM_SYMBOLIC_FINGERPRINT}): the "
            "held-out templates would not be the same evaluation set; install the "
            "version in constraints.txt (pip install -c constraints.txt -e .)")


def source_versions(cfg: DataConfig) -> dict[str, str | None]:
    """The versions of what the run's problems come from, for config.json and
    eval.json (a local file is its own record)."""
    sources = {cfg.dataset, cfg.eval_dataset or cfg.dataset}
    out: dict[str, str | None] = {}
    if "gsm_symbolic" in sources:
        out["reasoning-gym"] = _version("reasoning-gym")
        out["gsm_symbolic_fingerprint"] = gsm_symbolic_fingerprint()
    if "gsm8k" in sources:
        out["datasets"] = _version("datasets")
    return out


def gsm_symbolic(size: int, seed: int, templates: Callable[[int], bool] = lambda t: True
                 ) -> list[Problem]:
    """The first `size` problems of reasoning-gym's gsm_symbolic stream `seed` (offline)
    whose template passes `templates`, with their worked solutions.

    Problem i of a stream depends only on (seed, i), and its template is the i-th draw
    of Random(seed): a longer stream extends a shorter one, so filtering by template
    keeps every machine's problems the same. `index` is the position in the stream.
    """
    import reasoning_gym  # here: ~0.7 s to import, and only this source needs it

    check_gsm_symbolic()
    length = size
    while True:
        dataset = reasoning_gym.create_dataset("gsm_symbolic", size=length, seed=seed)
        chosen = [i for i, t in enumerate(dataset.task_indices) if templates(t)][:size]
        if len(chosen) == size:
            break
        length *= 2
    rows = []
    for i in chosen:
        x = dataset[i]
        solution = x["metadata"]["answer_cot"].rsplit("####", 1)[0].strip()
        rows.append({"question": x["question"], "answer": f"{solution}\n#### {x['answer']}",
                     "template": dataset.task_indices[i]})
    problems = problems_from_rows(rows, f"gsm_symbolic(seed={seed})", "error")
    return [p._replace(index=i) for p, i in zip(problems, chosen)]


def sft_target(problem: Problem, prefill: str = "") -> str:
    """The completion SFT teaches for `problem`: its worked solution and answer in the
    format the rewards ask for, less the `prefill` the prompt already holds (the
    stop token is the caller's to add)."""
    if not problem.solution:
        raise DataError(f"problem {problem.index} has no worked solution (text before its "
                        "'#### N' line) to train on")
    text = f"<reasoning>{problem.solution}</reasoning>\n<answer>{problem.answer}</answer>"
    if not text.startswith(prefill):
        raise DataError(f"the prefill {prefill!r} is not how the target begins ({text[:20]!r})")
    return text[len(prefill):]


def gsm8k_hub(split: str, on_malformed: str, need_solution: bool = False) -> list[Problem]:
    import datasets  # here: ~0.7 s to import, and only this source needs it

    try:
        rows = datasets.load_dataset("openai/gsm8k", "main", split=split)
    except Exception as e:  # offline, or the hub refuses: say so in one line
        raise DataError(f"could not load openai/gsm8k ({split}) through datasets: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return problems_from_rows(rows, f"openai/gsm8k[{split}]", on_malformed, need_solution)


def _is_local(name: str) -> bool:
    return Path(name).suffix.lower() in LOCAL_SUFFIXES or Path(name).exists()


def _check_dataset_name(name: str) -> None:
    if not _is_local(name) and name not in ("gsm_symbolic", "gsm8k"):
        raise DataError(f"unknown dataset {name!r}: use gsm_symbolic, gsm8k, or a path to a "
                        f"{'/'.join(LOCAL_SUFFIXES)} file")


SPLITS = ("train", "eval", "eval_same_template")


def load_problems(cfg: DataConfig, split: str, need_solution: bool = False) -> list[Problem]:
    """The training ('train') or held-out ('eval') problems the config names
    (`need_solution`: rows without a worked solution are malformed, for SFT).

    gsm_symbolic: training draws only templates outside HELD_OUT_TEMPLATES, 'eval'
    only those (unseen templates: the headline figure), and 'eval_same_template'
    new problems of the training templates (new numbers and names), none of whose
    questions is a training question. Other datasets have no templates: both
    evaluation splits are their held-out problems.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    name = cfg.dataset if split == "train" else (cfg.eval_dataset or cfg.dataset)
    _check_dataset_name(name)
    if _is_local(name):
        if split == "eval" and cfg.eval_dataset is None:
            raise DataError("a local training file needs --data.eval-dataset FILE for held-out problems")
        return problems_from_rows(read_local_rows(name), str(name), cfg.on_malformed,
                                  need_solution)
    if name == "gsm8k":
        return gsm8k_hub("train" if split == "train" else "test", cfg.on_malformed,
                         need_solution)
    def seen(t):
        return t not in HELD_OUT_TEMPLATES

    if split == "train":
        return gsm_symbolic(cfg.num_train, cfg.train_seed, seen)
    if split == "eval":
        return gsm_symbolic(cfg.num_eval, cfg.eval_seed, HELD_OUT_TEMPLATES.__contains__)
    # Different seeds make different problems; drop any that coincide with training anyway.
    train = {p.question for p in gsm_symbolic(cfg.num_train, cfg.train_seed, seen)}
    return [p for p in gsm_symbolic(cfg.num_eval, cfg.eval_seed, seen) if p.question not in train]


def held_out_problems(cfg: DataConfig, split: str, count: int) -> list[Problem]:
    """The first `count` problems of held-out `split`. A generated set (gsm_symbolic)
    is drawn as long as `count` needs, past `num_eval` if so: problem i depends only
    on (seed, i), so the first n are the same at any length. A fixed set (gsm8k, a
    file) gives what it has; a shortfall is logged."""
    if split not in SPLITS[1:]:
        raise ValueError(f"held-out split must be one of {SPLITS[1:]}, got {split!r}")
    name = cfg.eval_dataset or cfg.dataset
    size = max(cfg.num_eval, count)
    problems = load_problems(dataclasses.replace(cfg, num_eval=size), split)
    if name == "gsm_symbolic":
        while len(problems) < count:  # eval_same_template drops training questions
            size += count - len(problems) + 16
            problems = load_problems(dataclasses.replace(cfg, num_eval=size), split)
    elif len(problems) < count:
        log.warning("%d held-out problems asked for, %s has %d", count, name, len(problems))
    return problems[:count]


def order_at(num_problems: int, seed: int, position: int, count: int) -> np.ndarray:
    """Indices of problems position .. position+count-1 of the training stream: a fresh
    permutation every epoch, a pure function of (seed, position)."""
    if num_problems <= 0:
        raise ValueError("no problems to order")
    out = np.empty(count, np.int64)
    for i, pos in enumerate(range(position, position + count)):
        epoch, offset = divmod(pos, num_problems)
        out[i] = _epoch_permutation(num_problems, seed, epoch)[offset]
    return out


_PERMUTATIONS: dict[tuple[int, int, int], np.ndarray] = {}


def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    key = (n, seed, epoch)
    if key not in _PERMUTATIONS:
        if len(_PERMUTATIONS) > 8:
            _PERMUTATIONS.clear()
        _PERMUTATIONS[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERMUTATIONS[key]


def batch_at(problems: Sequence[Problem], seed: int, position: int, count: int) -> list[Problem]:
    """The `count` training problems starting at stream `position`."""
    return [problems[i] for i in order_at(len(problems), seed, position, count)]
