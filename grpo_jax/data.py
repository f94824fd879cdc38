"""Math word problems: GSM8K (hub or local files) and reasoning-gym's gsm_symbolic,
the prompt template, and a deterministic, resumable training order.

Every problem is a `Problem(question, answer, index)`: `answer` is the reference
number as a string ("1234", "-3.5"), `index` the row it came from, so a report
can point back at the source. The training order is a pure function of
(shuffle seed, position): a checkpoint stores the position and nothing else.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

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


def format_prompt(question: str) -> str:
    """The instruction and the question as one Gemma user turn (Gemma has no system
    role), ending where the model's turn begins."""
    return chat_prompt(f"{SYSTEM_PROMPT}\n\n{question.strip()}")


def encode_prompts(tokenizer, problems: Sequence[Problem]) -> list[list[int]]:
    """BOS + ids of each problem's formatted prompt."""
    return [tokenizer.encode(format_prompt(p.question)) for p in problems]


_NUMBER = re.compile(r"^[-+]?\d+(\.\d+)?$")


def gsm8k_answer(text: str) -> str:
    """The reference number after GSM8K's '####' ("#### 1,234" -> "1234")."""
    if "####" not in text:
        raise DataError("answer has no '#### N' line")
    value = text.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "")
    if not _NUMBER.match(value):
        raise DataError(f"answer after '####' is not a number: {value[:40]!r}")
    return value


def problems_from_rows(rows: Iterable[Any], source: str, on_malformed: str = "skip"
                       ) -> list[Problem]:
    """GSM8K-style rows ({"question": str, "answer": "... #### N"}) -> problems.

    A malformed row is reported with its index and skipped, or (on_malformed="error")
    refused; it is never used.
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
            value = gsm8k_answer(answer) if isinstance(answer, str) and "####" in answer \
                else _plain_number(answer)
            problems.append(Problem(question, value, index))
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


def gsm_symbolic(size: int, seed: int) -> list[Problem]:
    """`size` problems from reasoning-gym's gsm_symbolic generator (offline)."""
    import reasoning_gym  # here: ~0.7 s to import, and only this source needs it

    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
    return problems_from_rows(
        ({"question": x["question"], "answer": str(x["answer"])} for x in dataset),
        f"gsm_symbolic(seed={seed})", "error")


def gsm8k_hub(split: str, on_malformed: str) -> list[Problem]:
    import datasets  # here: ~0.7 s to import, and only this source needs it

    try:
        rows = datasets.load_dataset("openai/gsm8k", "main", split=split)
    except Exception as e:  # offline, or the hub refuses: say so in one line
        raise DataError(f"could not load openai/gsm8k ({split}) through datasets: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return problems_from_rows(rows, f"openai/gsm8k[{split}]", on_malformed)


def _is_local(name: str) -> bool:
    return Path(name).suffix.lower() in LOCAL_SUFFIXES or Path(name).exists()


def _check_dataset_name(name: str) -> None:
    if not _is_local(name) and name not in ("gsm_symbolic", "gsm8k"):
        raise DataError(f"unknown dataset {name!r}: use gsm_symbolic, gsm8k, or a path to a "
                        f"{'/'.join(LOCAL_SUFFIXES)} file")


def load_problems(cfg: DataConfig, split: str) -> list[Problem]:
    """The training ('train') or held-out ('eval') problems the config names."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    name = cfg.dataset if split == "train" else (cfg.eval_dataset or cfg.dataset)
    _check_dataset_name(name)
    if _is_local(name):
        if split == "eval" and cfg.eval_dataset is None:
            raise DataError("a local training file needs --data.eval-dataset FILE for held-out problems")
        return problems_from_rows(read_local_rows(name), str(name), cfg.on_malformed)
    if name == "gsm8k":
        return gsm8k_hub("train" if split == "train" else "test", cfg.on_malformed)
    if split == "train":
        return gsm_symbolic(cfg.num_train, cfg.train_seed)
    # Different seeds make different problems; drop any that coincide with training anyway.
    train = {p.question for p in gsm_symbolic(cfg.num_train, cfg.train_seed)}
    held_out = [p for p in gsm_symbolic(cfg.num_eval, cfg.eval_seed) if p.question not in train]
    return held_out


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
