"""Stop strings as a token-level automaton the sampler runs inside its decode loop.

A row must stop once its decoded completion contains a stop string, even when the
string ends inside a token (the model may write "</answer>\\n" as "</", "answer",
">\\n"). Decoding text inside `jax.jit` is not possible, so the check runs on bytes:
an Aho-Corasick automaton over the UTF-8 bytes of the stop strings, folded into a
table over whole tokens,

    table[state, token] = the automaton state after reading the token's bytes,
                          or MATCHED (-1) if a stop string ended inside them.

Each decode step is then one gather per row (`advance`). The table is built once
per (tokenizer, strings) with NumPy, one byte column at a time over all tokens.
Matching starts at the first completion token: text in the prompt (a prefill)
never completes a stop string.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MATCHED = -1


def byte_automaton(strings: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Aho-Corasick over bytes -> (delta [S, 256] int32 next state, accept [S] bool:
    some string ends at this state). State 0 is the start."""
    if not strings or any(not s for s in strings):
        raise ValueError("stop strings must be non-empty")
    children: list[dict[int, int]] = [{}]
    accept = [False]
    for s in strings:
        node = 0
        for byte in s:
            if byte not in children[node]:
                children.append({})
                accept.append(False)
                children[node][byte] = len(children) - 1
            node = children[node][byte]
        accept[node] = True
    n = len(children)
    delta = np.zeros((n, 256), np.int32)
    fail = [0] * n
    order = list(children[0].items())  # breadth first: a state's fail link is done first
    for byte, child in order:
        delta[0, byte] = child
    while order:
        _, node = order.pop(0)
        accept[node] = accept[node] or accept[fail[node]]
        delta[node] = delta[fail[node]]
        for byte, child in children[node].items():
            fail[child] = delta[fail[node], byte]
            delta[node, byte] = child
            order.append((byte, child))
    return delta, np.asarray(accept)


def token_table(token_bytes: Sequence[bytes], strings: Sequence[str]) -> np.ndarray:
    """[S, V] int32: each automaton state's successor after a whole token, MATCHED
    where a stop string ends within the token's bytes."""
    return fold_tokens(token_bytes, *byte_automaton([s.encode("utf-8") for s in strings]))


def fold_tokens(token_bytes: Sequence[bytes], delta: np.ndarray, accept: np.ndarray
                ) -> np.ndarray:
    """A byte DFA (delta [S, 256], accept [S]) folded over whole tokens: [S, V] int32,
    the state after each token's bytes, MATCHED where an accepting state is reached
    within them."""
    lengths = np.fromiter((len(b) for b in token_bytes), np.int64, len(token_bytes))
    width = int(lengths.max(initial=0))
    columns = np.zeros((len(token_bytes), max(width, 1)), np.uint8)
    for i, b in enumerate(token_bytes):
        columns[i, :len(b)] = np.frombuffer(b, np.uint8)
    # Longest tokens first: column c is read by a prefix of the rows.
    order = np.argsort(-lengths, kind="stable")
    columns, active = columns[order], [int(np.sum(lengths > c)) for c in range(width)]
    num_states = delta.shape[0]
    table = np.empty((num_states, len(token_bytes)), np.int32)
    for start in range(num_states):
        state = np.full(len(token_bytes), start, np.int32)
        matched = np.zeros(len(token_bytes), bool)
        for c, n in enumerate(active):
            state[:n] = delta[state[:n], columns[:n, c]]
            matched[:n] |= accept[state[:n]]
        row = np.where(matched, MATCHED, state)
        table[start, order] = row
    return table


def vocab_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    """Each model token id's bytes: the tokenizer's, then b"" for ids past them (a
    model vocabulary padded beyond the tokenizer's decodes to nothing)."""
    pieces = list(tokenizer.token_bytes())
    if len(pieces) > vocab_size:
        raise ValueError(f"the tokenizer has {len(pieces)} tokens, more than the model's "
                         f"{vocab_size}")
    return pieces + [b""] * (vocab_size - len(pieces))


@functools.lru_cache(maxsize=8)
def _cached_table(tokenizer, strings: tuple[str, ...], vocab_size: int) -> jax.Array:
    return jnp.asarray(token_table(vocab_bytes(tokenizer, vocab_size), strings))


def stop_table(tokenizer, strings: Sequence[str], vocab_size: int) -> jax.Array | None:
    """The sampler's table for `strings` over a model vocabulary of `vocab_size`
    (None without stop strings)."""
    if not strings:
        return None
    return _cached_table(tokenizer, tuple(strings), vocab_size)


def advance(table: jax.Array, state: jax.Array, token: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows' automaton states [B] after `token` [B] -> (new state, stop string matched)."""
    nxt = table[state, token]
    return jnp.maximum(nxt, 0), nxt == MATCHED


def first_match_end(text: str, strings: Sequence[str]) -> int | None:
    """End offset of the earliest-ending stop string in `text` (None: none)."""
    ends = [i + len(s) for s in strings if (i := text.find(s)) >= 0]
    return min(ends) if ends else None


def cut_after_stop(text: str, strings: Sequence[str]) -> str:
    """`text` up to the end of its earliest-ending stop string (all of it if none): the
    token that completes a stop string may carry text past it ('>.' of '</answer>.')."""
    end = first_match_end(text, strings)
    return text if end is None else text[:end]
