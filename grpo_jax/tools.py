"""Tool calls inside completions: the protocol, the registry, and gold targets with calls.

A tool is a pure function from the text of a call to the text of its result,
registered by name (`register_tool`, like a reward). A call is delimited by three
markers (`SamplerConfig.tool_call`, default GSM8K's): the policy writes the opening
marker, the call and the closing marker (`<<28*4=`), and the tool writes its result
and the result's closing marker (`112>>`). The completion then reads `<<28*4=112>>`
and the policy goes on writing after it.

In the sampler (`decode.py`), each row runs a byte automaton for "open ... close"
folded over whole tokens (`call_table`, as stop strings are: a call that ends inside
a token is seen). A row that completes a call waits; the driver (`sampler.py`) reads
it back, runs the tool on the host (`Toolbox.result_ids`) and hands the result's
tokens to the row, which writes them one a decode step (fed through the model like
any token, so the KV cache holds them) before it samples again. Tokens the tool wrote
are marked in the row's policy mask: they are context, never the policy's choice.

Text the token that completes a call carries past the closing marker stays where the
policy wrote it; the result follows it. A call past `max_tool_calls` gets no result:
the policy writes on, its own result included. A tool that raises, or runs past its
timeout, writes `error: ...` as its result; the run goes on.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import re
from fractions import Fraction
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax import calculator as calculator_lib
from grpo_jax import stop_strings

ToolFn = Callable[[str], str]

_TOOLS: dict[str, ToolFn] = {}


def register_tool(name: str, fn: ToolFn) -> None:
    """Make `fn` (text of a call -> text of its result) available as `--sampler.tools NAME`."""
    if not name or not callable(fn):
        raise ValueError("a tool needs a name and a callable")
    _TOOLS[name] = fn


def tool_names() -> tuple[str, ...]:
    return tuple(_TOOLS)


def get_tool(name: str) -> ToolFn:
    try:
        return _TOOLS[name]
    except KeyError:
        raise ValueError(f"unknown tool {name!r}; registered: {', '.join(_TOOLS)}") from None


register_tool("calculator", calculator_lib.calculator)


@dataclasses.dataclass(frozen=True)
class CallMarkers:
    open: str = "<<"          # the policy opens a call with this
    close: str = "="          # ... and ends it with this: the tool answers now
    result_close: str = ">>"  # the tool's result ends with this

    def __post_init__(self):
        if not (self.open and self.close and self.result_close):
            raise ValueError(f"tool call markers must be non-empty, got {self}")


# ---------------------------------------------------------------------------
# Detecting a completed call on the device


def call_automaton(markers: CallMarkers) -> tuple[np.ndarray, np.ndarray]:
    """A byte DFA (delta [S, 256], accept [S]) that accepts each time an opening marker
    is followed, later, by a closing marker: outside a call it looks for `open`, inside
    for `close`; state DONE (accepting) reads on as the start state does."""
    d_open, a_open = stop_strings.byte_automaton([markers.open.encode()])
    d_close, a_close = stop_strings.byte_automaton([markers.close.encode()])
    n_open, n_close = len(a_open), len(a_close)
    inside, done = n_open, n_open + n_close
    delta = np.zeros((done + 1, 256), np.int32)
    delta[:n_open] = np.where(a_open[d_open], inside, d_open)
    delta[inside:done] = np.where(a_close[d_close], done, inside + d_close)
    delta[done] = delta[0]
    accept = np.zeros(done + 1, bool)
    accept[done] = True
    return delta, accept


@functools.lru_cache(maxsize=8)
def _cached_call_table(tokenizer, markers: CallMarkers, vocab_size: int) -> jax.Array:
    delta, accept = call_automaton(markers)
    return jnp.asarray(stop_strings.fold_tokens(stop_strings.vocab_bytes(tokenizer, vocab_size),
                                                delta, accept))


# ---------------------------------------------------------------------------
# Answering calls on the host

_EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=4,
                                                  thread_name_prefix="grpo-tool")


def pending_call(text: str, markers: CallMarkers) -> str | None:
    """The call in `text` (the policy's text since the last tool result): what lies
    between the first opening marker and the first closing marker after it."""
    start = text.find(markers.open)
    if start < 0:
        return None
    start += len(markers.open)
    end = text.find(markers.close, start)
    return None if end < 0 else text[start:end]


@dataclasses.dataclass(frozen=True, eq=False)
class Toolbox:
    """A tool and what the sampler needs to run it: the call automaton on the device,
    the markers, the bounds, and the tokenizer that turns results into tokens."""

    name: str
    fn: ToolFn
    tokenizer: Any
    markers: CallMarkers
    table: jax.Array          # [S, V] the call automaton over tokens
    max_calls: int            # calls answered per completion
    max_tokens: int           # a result's tokens, closing marker included
    timeout_s: float

    def result_text(self, call: str | None) -> str:
        """The text the tool writes for `call` (None: no call could be read back)."""
        if call is None:
            out = "error: no call"
        else:
            future = _EXECUTOR.submit(self.fn, call)
            try:
                out = future.result(timeout=self.timeout_s)
                if not isinstance(out, str):
                    raise TypeError(f"tool {self.name!r} returned {type(out).__name__}, "
                                    "not str")
            except concurrent.futures.TimeoutError:
                future.cancel()  # a running thread cannot be stopped; its result is dropped
                out = f"error: timed out after {self.timeout_s:g} s"
            except Exception as e:  # any failure of the tool is its result, never the run's
                out = f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        # The result is closed exactly once, by the marker the protocol appends.
        return out.replace(self.markers.result_close, "") + self.markers.result_close

    def result_ids(self, tokens: Sequence[int], policy: Sequence[bool]) -> list[int]:
        """The tokens to write into a row that has just completed a call: its completion
        so far (`tokens`) and which of them the policy wrote (`policy`)."""
        tokens, policy = np.asarray(tokens), np.asarray(policy, bool)
        tool_written = np.flatnonzero(~policy)
        since = tool_written[-1] + 1 if tool_written.size else 0
        call = pending_call(self.tokenizer.decode(tokens[since:].tolist()), self.markers)
        ids = self.tokenizer.encode(self.result_text(call), add_bos=False)
        if len(ids) > self.max_tokens:
            ids = self.tokenizer.encode(f"error: result longer than {self.max_tokens} tokens"
                                        + self.markers.result_close, add_bos=False)
        return ids[:self.max_tokens]


def toolbox(tokenizer, sampling, vocab_size: int) -> Toolbox | None:
    """The run's tool, from `sampling` (a SamplerConfig); None without one."""
    if not sampling.tools:
        return None
    name, = sampling.tools
    markers = CallMarkers(*sampling.tool_call)
    return Toolbox(name, get_tool(name), tokenizer, markers,
                   _cached_call_table(tokenizer, markers, vocab_size),
                   sampling.max_tool_calls, sampling.tool_result_tokens,
                   sampling.tool_timeout_s)


# ---------------------------------------------------------------------------
# Gold solutions written with calls (SFT targets)

_NUM = r"[$€£]?[0-9][0-9,]*(?:\.[0-9]+)?%?"
_STEP = re.compile(rf"(?<![\w.,$€£])({_NUM}(?:[ \t]*[-+*/x×÷][ \t]*{_NUM})+)[ \t]*=[ \t]*"
                   r"(-?[$€£]?[0-9][0-9,]*(?:\.[0-9]+)?)(?![0-9])")


def _value(text: str) -> Fraction | None:
    try:
        return calculator_lib.evaluate(text)
    except calculator_lib.CalculatorError:
        return None


def with_calls(solution: str, markers: CallMarkers = CallMarkers(), max_calls: int = 8,
               tool: ToolFn = calculator_lib.calculator) -> str:
    """A worked solution with its arithmetic steps written as calls: `28 x 4 = 112`
    becomes `<<28*4=112>>`, the result as `tool` writes it. A step whose stated result
    is not its expression's exact value, or past `max_calls`, stays as written."""
    out, last, calls = [], 0, 0
    for m in _STEP.finditer(solution):
        if calls >= max_calls:
            break
        expr, stated = m.group(1), m.group(2)
        value, claimed = _value(expr), _value(stated.replace("$", "").replace("€", "")
                                              .replace("£", ""))
        if value is None or claimed is None or value != claimed:
            continue
        call = re.sub(r"[ \t$€£]", "", expr).replace("x", "*").replace("×", "*") \
            .replace("÷", "/")
        out.append(solution[last:m.start()])
        out.append(f"{markers.open}{call}{markers.close}{tool(call)}{markers.result_close}")
        last, calls = m.end(), calls + 1
    out.append(solution[last:])
    return "".join(out)


def split_calls(text: str, markers: CallMarkers) -> list[tuple[str, bool]]:
    """`text` as (piece, written by the policy) in order: a tool's piece is what follows
    a call's closing marker up to and including the result's closing marker."""
    pieces, at = [], 0
    while True:
        start = text.find(markers.open, at)
        close = -1 if start < 0 else text.find(markers.close, start + len(markers.open))
        end = -1 if close < 0 else text.find(markers.result_close, close + len(markers.close))
        if end < 0:
            pieces.append((text[at:], True))
            return [p for p in pieces if p[0]]
        close += len(markers.close)
        pieces += [(text[at:close], True), (text[close:end + len(markers.result_close)], False)]
        at = end + len(markers.result_close)


def encode_with_calls(tokenizer, text: str, markers: CallMarkers
                      ) -> tuple[list[int], list[bool]]:
    """Token ids of `text` (no BOS) and which the policy writes: each piece encoded on
    its own, as the sampler produces them (the tool's result is tokenized alone)."""
    ids, policy = [], []
    for piece, by_policy in split_calls(text, markers):
        piece_ids = tokenizer.encode(piece, add_bos=False)
        ids += piece_ids
        policy += [by_policy] * len(piece_ids)
    return ids, policy
