"""Stop strings: the token automaton against a plain text search, and in the sampler."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from grpo_jax import sampler, stop_strings
from grpo_jax.config import SamplerConfig
from grpo_jax.model.config import TINY
from grpo_jax.model import gemma3
from grpo_jax.tokenizer import ByteTokenizer
from tests.uncached_sampler import sample_uncached


def _first_stop(pieces, ids, strings) -> int | None:
    """Reference: the first position whose decoded prefix contains a stop string."""
    for n in range(1, len(ids) + 1):
        text = b"".join(pieces[i] for i in ids[:n])
        if any(s.encode() in text for s in strings):
            return n - 1
    return None


def _automaton_stop(table, ids) -> int | None:
    state = np.zeros(1, np.int32)
    for n, t in enumerate(ids):
        state, matched = stop_strings.advance(table, state, np.asarray([t]))
        if bool(matched[0]):
            return n
    return None


@pytest.mark.parametrize("strings", [["</answer>"], ["ab", "bab"], ["aab"], ["\n\n", "</a"]])
def test_token_table_matches_a_text_search(strings):
    seed = int(np.random.default_rng().integers(1 << 30))
    rng = np.random.default_rng(seed)
    alphabet = list(b"<>/answer\nab ")
    # A vocabulary of random byte strings (1-5 bytes), plus whole and split stop strings.
    pieces = [b""] + [bytes(rng.choice(alphabet, size=rng.integers(1, 6))) for _ in range(300)]
    for s in strings:
        b = s.encode()
        pieces += [b, b[:1], b[1:], b + b"xy", b"x" + b[:-1]]
    table = np.asarray(stop_strings.token_table(pieces, strings))
    for _ in range(300):
        ids = rng.integers(0, len(pieces), size=rng.integers(1, 12)).tolist()
        assert _automaton_stop(table, ids) == _first_stop(pieces, ids, strings), (seed, ids)


def test_a_stop_string_ending_inside_a_token():
    pieces = [b"", b"</", b"answer", b">\n", b">", b"x"]
    table = stop_strings.token_table(pieces, ["</answer>"])
    assert _automaton_stop(table, [5, 1, 2, 3, 5]) == 3  # ">\n" completes it
    assert _automaton_stop(table, [1, 2, 5, 4]) is None  # "</answerx>": never
    assert _automaton_stop(table, [1, 2, 4]) == 2


def test_real_tokenizer_bytes_decode_like_the_tokenizer(embedded_tokenizer):
    tok = embedded_tokenizer
    pieces = tok.token_bytes()
    text = "<reasoning>3 + 4 = 7\n  so   ünï 日本 🙂</reasoning>\n<answer>7</answer>\n\nmore"
    ids = tok.encode(text, add_bos=False)
    assert b"".join(pieces[i] for i in ids).decode() == tok.decode(ids) == text
    # A token that carries the closing '>' and more: the string ends inside it.
    gt_more = next(i for i, p in enumerate(pieces) if p.startswith(b">") and len(p) > 1)
    body = tok.encode("<answer>7</answer", add_bos=False)
    table = stop_strings.stop_table(tok, ("</answer>",), len(pieces))
    assert _automaton_stop(table, body + [gt_more]) == len(body)
    assert _automaton_stop(table, body) is None


def test_bad_stop_strings():
    with pytest.raises(ValueError, match="non-empty"):
        SamplerConfig(stop_strings=("",))
    with pytest.raises(ValueError, match="stop_table"):
        sampler.sample_prompts(gemma3.init_params(TINY, jax.random.key(0)), [[2, 3]],
                               jax.random.key(0), cfg=TINY,
                               sampling=SamplerConfig(max_new_tokens=4, stop_strings=("a",)))


def _stop_run(strings, temperature=1.0, uncached=False):
    tok = ByteTokenizer()
    params = gemma3.init_params(TINY, jax.random.key(3))
    params = {**params, "embed": params["embed"] * 0.05}  # flat logits: varied bytes
    sampling = SamplerConfig(max_new_tokens=40, temperature=temperature, stop_ids=(),
                             prompt_bucket=8, stop_strings=tuple(strings))
    table = stop_strings.stop_table(tok, strings, TINY.vocab_size)
    prompts = [[2] + list(range(3 + r, 9 + r)) for r in range(8)]
    if uncached:
        tokens, mask = sampler.left_pad(prompts, multiple=8)
        out = sample_uncached(params, tokens, mask, jax.random.key(5), cfg=TINY,
                                      sampling=sampling, stop_table=table)
        return tok, jax.device_get(out)
    return tok, sampler.sample_prompts(params, prompts, jax.random.key(5), cfg=TINY,
                                       sampling=sampling, group=1, stop_table=table)


# Three single characters: in 40 near-uniform draws over 512 ids some rows write one
# and some do not.
COMMON = ["e", "a", "\x10"]


def test_sampler_stops_at_the_token_completing_a_stop_string():
    tok, out = _stop_run(COMMON)
    for row in range(out.tokens.shape[0]):
        n = int(out.lengths[row])
        ids = out.tokens[row, :n].tolist()
        text, before = tok.decode(ids), tok.decode(ids[:-1])
        if out.stopped[row]:
            assert any(s in text for s in COMMON) and not any(s in before for s in COMMON)
        else:
            assert n == 40 and not any(s in text for s in COMMON)
        assert np.all(out.tokens[row, n:] == 0)
    assert 0 < out.stopped.sum() < len(out.stopped)


def test_two_stop_strings_and_none_reached():
    _, free = _stop_run(["\x00never"])  # a string no row writes: every row runs the budget
    assert not free.stopped.any() and (free.lengths == 40).all()
    # Two ASCII bytes row 0 wrote next to each other: a string split over two tokens.
    written = [int(t) - ByteTokenizer.OFFSET for t in free.tokens[0]]
    i = next(i for i in range(len(written) - 1)
             if all(0 < b < 128 for b in written[i:i + 2]))
    pair = bytes(written[i:i + 2]).decode()
    _, out = _stop_run([pair, "\x00never"])
    first = next(j for j in range(len(written) - 1) if bytes(written[j:j + 2]) == pair.encode())
    assert out.stopped[0] and int(out.lengths[0]) == first + 2
    assert out.tokens[0, :first + 2].tolist() == free.tokens[0, :first + 2].tolist()


def test_cached_and_uncached_stop_alike():
    _, a = _stop_run(COMMON)
    _, b = _stop_run(COMMON, uncached=True)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.stopped, b.stopped)


def test_decoded_completions_end_at_the_stop_string():
    out = sampler.SampleOutput(tokens=np.asarray([[10, 11, 12, 1]]), logprobs=None,
                               sampling_logprobs=None, lengths=np.asarray([4]),
                               stopped=np.asarray([True]), steps=np.int32(4))

    class Tok:
        def decode(self, ids):
            return {(10, 11, 12, 1): "<answer>7</answer>."}[tuple(ids)]

    assert sampler.decode_completions(Tok(), out) == ["<answer>7</answer>."]
    assert sampler.decode_completions(Tok(), out, ("</answer>",)) == ["<answer>7</answer>"]
    assert dataclasses.replace(SamplerConfig(), stop_strings=("x",)).stop_strings == ("x",)
