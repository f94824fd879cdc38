"""Tool calls inside completions (`tools.py`, `calculator.py`, the sampler's segments):
the calculator against a tree evaluated independently, the call automaton against a
text scan, the sampler's inserted tokens against the tokenizer's encoding of the
results, rows with and without calls against rows decoded one by one, failing tools
and the call bound, the loss with tool tokens masked against a float64 restatement
that drops them, SFT targets with calls, and a tool-using run resumed."""
from __future__ import annotations

import dataclasses
import json
import random
import time
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import calculator, grpo, sampler, sft, tools, train, update
from grpo_jax.config import GRPOConfig, OptimizerConfig, SamplerConfig
from grpo_jax.data import Problem
from grpo_jax.model import gemma3, load
from grpo_jax.model.config import TINY
from grpo_jax.presets import TRAIN_PRESETS
from grpo_jax.tokenizer import ByteTokenizer
from test_grpo import np_policy_loss
from test_train import _rows, stopped_then_resumed

MARKERS = tools.CallMarkers()


class CallTokenizer(ByteTokenizer):
    """The byte tokenizer, with the tiny model's ids past the bytes made into pieces of
    calls, so a random model writes calls often: a whole call, an opening marker and a
    number, and a closing marker with text after it inside the same token."""

    PIECES = {**{i: b"<<6*7=" for i in range(300, 360)}, **{i: b"<<1" for i in range(360, 420)},
              **{i: b"2/4=x" for i in range(420, 480)}, **{i: b"(" for i in range(480, 512)}}

    def _bytes(self, i: int) -> bytes:
        return self.PIECES.get(i, bytes([i - self.OFFSET]) if self.OFFSET <= i < 259 else b"")

    def decode(self, ids, *, skip_special_tokens=True) -> str:
        return b"".join(self._bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> list[bytes]:
        return [self._bytes(i) for i in range(TINY.vocab_size)]


TOK = CallTokenizer()


# ---------------------------------------------------------------------------
# The calculator


def _random_expression(rng: random.Random, depth: int = 0) -> tuple[str, Fraction]:
    """(text, value): a random expression tree, its value computed on the tree."""
    if depth > 3 or rng.random() < 0.3:
        if rng.random() < 0.3:
            whole, frac = rng.randint(0, 999), rng.randint(0, 99)
            return f"{whole}.{frac:02d}", Fraction(whole) + Fraction(frac, 100)
        n = rng.randint(0, 20000)
        return (f"{n:,}" if rng.random() < 0.2 else str(n)), Fraction(n)
    kind = rng.choice("+-*/%un")
    if kind == "u":
        text, value = _random_expression(rng, depth + 1)
        return f"-({text})", -value
    if kind == "%":
        text, value = _random_expression(rng, depth + 1)
        return f"({text})%", value / 100
    if kind == "n":
        text, value = _random_expression(rng, depth + 1)
        return f"({text})", value
    (a, x), (b, y) = _random_expression(rng, depth + 1), _random_expression(rng, depth + 1)
    if kind == "/" and y == 0:
        y, b = Fraction(7), "7"
    value = {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[kind]
    op = rng.choice(["*", "x", "×"]) if kind == "*" else rng.choice(["/", "÷"]) \
        if kind == "/" else kind
    return f"({a}) {op} ({b})", value


def test_calculator_equals_the_expression_tree():
    rng = random.Random(0)
    for _ in range(400):
        text, value = _random_expression(rng)
        if len(text) > calculator.MAX_CHARS:
            continue
        try:
            got = calculator.evaluate(text)
        except calculator.CalculatorError as e:
            assert "digits" in str(e) or "nested" in str(e), (text, e)
            continue
        assert got == value, text


@pytest.mark.parametrize("text,value", [
    ("28*4", 112), ("2+3*4", 14), ("(2+3)*4", 20), ("10-4-3", 3), ("2*3/4", Fraction(3, 2)),
    ("30%*160", 48), ("0.1+0.2", Fraction(3, 10)), ("1,000/8", 125), ("-3--3", 0),
    ("$12 * 3", 36), ("7 x 6", 42), ("8 ÷ 2", 4), (".5*4", 2), ("50%%", Fraction(1, 200))])
def test_calculator_cases(text, value):
    assert calculator.evaluate(text) == value


@pytest.mark.parametrize("text,message", [
    ("5/0", "division by zero"), ("5/(3-3)", "division by zero"), ("3+", "expected a number"),
    ("", "empty"), ("abc", "unexpected"), ("(1+2", "unbalanced"), ("1+2)", "unexpected"),
    ("2 3", "unexpected"), ("1,00+1", "malformed"), ("1" * 19, "digits"),
    ("(" * 17 + "1" + ")" * 17, "nested"), ("-" * 17 + "1", "nested"),
    ("9" * 18 + "*" + "9" * 18 + "*" + "9" * 18 + "*" + "9" * 18, "digits"),
    ("1+" * 101 + "1", "longer than"), ("2**3", r"unexpected '\*'"), ("1e5", "unexpected")])
def test_calculator_refuses_in_one_error(text, message):
    with pytest.raises(calculator.CalculatorError, match=message):
        calculator.calculator(text)


@pytest.mark.parametrize("value,text", [
    (Fraction(112), "112"), (Fraction(-3), "-3"), (Fraction(11, 10), "1.1"),
    (Fraction(10, 3), "3.333333"), (Fraction(2, 3), "0.666667"), (Fraction(-1, 8), "-0.125"),
    (Fraction(1, 10 ** 7), "0"), (Fraction(-1, 10 ** 7), "0"), (Fraction(5, 10 ** 7), "0.000001"),
    (Fraction(0), "0")])
def test_one_result_format(value, text):
    assert calculator.format_value(value) == text


# ---------------------------------------------------------------------------
# Detecting a call


def _text_scan(pieces: list[bytes]) -> list[bool]:
    """Per token: does the text since the last completed call (restarting at the
    token boundary after one) now hold an opening marker and a closing marker after it."""
    out, buffer = [], b""
    for piece in pieces:
        buffer += piece
        done = tools.pending_call(buffer.decode("latin-1"), MARKERS) is not None
        out.append(done)
        if done:
            buffer = b""
    return out


def test_call_automaton_equals_a_text_scan():
    table = np.asarray(tools._cached_call_table(TOK, MARKERS, TINY.vocab_size))
    pieces = TOK.token_bytes()
    rng = np.random.default_rng(0)
    marker_ids = [TOK.OFFSET + ord(c) for c in "<=>"]
    matches = 0
    for _ in range(200):
        # Mostly marker bytes and call pieces: calls split across tokens in every way.
        ids = rng.choice(marker_ids + [TOK.OFFSET + ord("7"), 300, 360, 420, 480, 10],
                         size=24).tolist()
        state, got = 0, []
        for t in ids:
            nxt = table[state, t]
            got.append(bool(nxt == -1))
            state = max(nxt, 0)
        want = _text_scan([pieces[t] for t in ids])
        assert got == want, ids
        matches += sum(got)
    assert matches > 100


def test_a_call_ending_inside_a_token_is_seen():
    table = np.asarray(tools._cached_call_table(TOK, MARKERS, TINY.vocab_size))
    lt, eq = (TOK.OFFSET + ord(c) for c in "<=")
    state = 0
    for t in (lt, lt, TOK.OFFSET + ord("1")):  # '<', '<', '1': inside, no call yet
        assert table[state, t] != -1
        state = table[state, t]
    assert table[state, 420] == -1  # "2/4=x": the call closes inside the token
    assert table[state, eq] == -1
    assert table[0, 300] == -1      # "<<6*7=": a whole call in one token
    assert table[0, 420] != -1      # a closing marker outside a call is no call


# ---------------------------------------------------------------------------
# The sampler with a tool


def _params(seed=3, flatten=0.05):
    params = gemma3.init_params(TINY, jax.random.key(seed))
    return {**params, "embed": params["embed"] * flatten}


def _sampling(**kw) -> SamplerConfig:
    base = dict(max_new_tokens=24, temperature=1.0, stop_ids=(), prompt_bucket=8,
                tools=("calculator",))
    return SamplerConfig(**{**base, **kw})


PROMPTS = [[2, 10, 11], [2, 40, 41, 42, 43], [2, 5], [2, 7, 7, 7], [2, 9, 8], [2, 100, 3],
           *([2, 50 + i] for i in range(6))]


def _spans(policy: np.ndarray, length: int) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of tool-written columns within the row's length."""
    spans, a = [], None
    for j in range(length):
        if not policy[j] and a is None:
            a = j
        if policy[j] and a is not None:
            spans.append((a, j))
            a = None
    return spans + ([(a, length)] if a is not None else [])


def _check_rows(out, tokenizer, budget, fn=calculator.calculator, timeout_s=2.0,
                max_calls=8) -> int:
    """Every tool span is exactly the tokenizer's encoding of the result of the call the
    policy wrote before it (cut by the token budget at the row's end); -> calls seen."""
    box = tools.Toolbox("t", fn, tokenizer, MARKERS, None, max_calls, 24, timeout_s)
    calls = 0
    for r in range(len(out.lengths)):
        n = int(out.lengths[r])
        policy, tokens = out.policy_mask[r], out.tokens[r]
        assert not policy[n:].any()
        start = 0
        for a, b in _spans(policy, n):
            call = tools.pending_call(tokenizer.decode(tokens[start:a].tolist()), MARKERS)
            assert call is not None, (r, a)
            want = tokenizer.encode(box.result_text(call), add_bos=False)
            if len(want) > 24:  # too long a result: the error text, cut to the bound
                want = tokenizer.encode("error: result longer than 24 tokens>>",
                                        add_bos=False)[:24]
            assert tokens[a:b].tolist() == want[:b - a], (r, call)
            assert b - a == len(want) or b == budget
            calls, start = calls + 1, b
        assert int(out.tool_calls[r]) == len(_spans(policy, n))
        # Tool tokens were not sampled: no log-prob is recorded for them.
        assert not out.logprobs[r][:n][~policy[:n]].any()
    return calls


def test_inserted_tokens_are_the_encoded_results_and_rows_match_one_by_one():
    params, sampling = _params(), _sampling(max_new_tokens=10)
    box = tools.toolbox(TOK, sampling, TINY.vocab_size)
    batch = sampler.sample_prompts(params, PROMPTS, jax.random.key(0), cfg=TINY,
                                   sampling=sampling, toolbox=box)
    calls = _check_rows(batch, TOK, sampling.max_new_tokens)
    assert calls >= 6 and 0 < int((batch.tool_calls == 0).sum()) < len(PROMPTS), \
        batch.tool_calls  # some rows call the tool, some do not
    # One row at a time (stream of one slot: same row ids, hence the same keys).
    single = sampler.sample_stream(params, PROMPTS, jax.random.key(0), cfg=TINY,
                                   sampling=sampling, slots=1, toolbox=box)
    for field in ("tokens", "lengths", "policy_mask", "tool_calls", "stopped"):
        np.testing.assert_array_equal(getattr(single, field), getattr(batch, field), field)
    np.testing.assert_allclose(single.logprobs, batch.logprobs, rtol=1e-5, atol=1e-5)
    # And refilled four slots at a time.
    stream = sampler.sample_stream(params, PROMPTS, jax.random.key(0), cfg=TINY,
                                   sampling=sampling, slots=4, refill=1, toolbox=box)
    np.testing.assert_array_equal(stream.tokens, batch.tokens)
    np.testing.assert_array_equal(stream.policy_mask, batch.policy_mask)


def test_greedy_rows_with_a_tool_match_rows_decoded_alone():
    params, sampling = _params(5, 0.2), _sampling(temperature=0.0, max_new_tokens=16)
    box = tools.toolbox(TOK, sampling, TINY.vocab_size)
    batch = sampler.sample_prompts(params, PROMPTS, jax.random.key(0), cfg=TINY,
                                   sampling=sampling, toolbox=box)
    _check_rows(batch, TOK, sampling.max_new_tokens)
    assert 0 < int((batch.tool_calls > 0).sum()) < len(PROMPTS), batch.tool_calls
    for i, p in enumerate(PROMPTS):
        alone = sampler.sample_prompts(params, [p], jax.random.key(9), cfg=TINY,
                                       sampling=sampling, toolbox=box)
        np.testing.assert_array_equal(alone.tokens[0], batch.tokens[i])
        np.testing.assert_array_equal(alone.policy_mask[0], batch.policy_mask[i])


def test_without_a_tool_the_sampler_is_unchanged_by_the_protocol():
    """Tools off: no policy mask, and the same tokens the tool-less sampler gave
    (sampling.tools is part of the compiled programs' key, so this is its own path)."""
    params = _params()
    plain = _sampling(tools=())
    out = sampler.sample_prompts(params, PROMPTS, jax.random.key(0), cfg=TINY, sampling=plain)
    assert out.policy_mask is None and out.tool_calls is None
    with pytest.raises(ValueError, match="toolbox"):
        sampler.sample_prompts(params, PROMPTS, jax.random.key(0), cfg=TINY,
                               sampling=_sampling())
    with pytest.raises(ValueError, match="toolbox"):
        sampler.sample_prompts(params, PROMPTS, jax.random.key(0), cfg=TINY, sampling=plain,
                               toolbox=tools.toolbox(TOK, _sampling(), TINY.vocab_size))


def _raises(call: str) -> str:
    raise RuntimeError(f"broken on {call!r}\nsecond line")


def _sleeps(call: str) -> str:
    time.sleep(1.0)
    return "late"


def test_a_tool_that_raises_or_times_out_writes_an_error_and_the_run_goes_on():
    box = tools.Toolbox("broken", _raises, TOK, MARKERS, None, 8, 24, 2.0)
    assert box.result_text("1+1") == "error: broken on '1+1'>>"
    slow = tools.Toolbox("slow", _sleeps, TOK, MARKERS, None, 8, 24, 0.05)
    began = time.monotonic()
    assert slow.result_text("1") == "error: timed out after 0.05 s>>"
    assert time.monotonic() - began < 0.9
    calc = tools.toolbox(TOK, _sampling(), TINY.vocab_size)
    assert calc.result_text("2+") == "error: expected a number>>"
    assert calc.result_text(None) == "error: no call>>"
    odd = tools.Toolbox("odd", lambda call: "7>>8", TOK, MARKERS, None, 8, 24, 1.0)
    assert odd.result_text("x") == "78>>"  # the result is closed exactly once
    long = tools.Toolbox("long", lambda call: "9" * 40, TOK, MARKERS, None, 8, 24, 1.0)
    assert TOK.decode(long.result_ids(TOK.encode("<<1=", add_bos=False), [True] * 4)) \
        == "error: result longer than "[:24]
    # In the sampler: every call is answered with the error text, rows go on.
    tools.register_tool("test-raises", _raises)
    sampling = _sampling(tools=("test-raises",))
    out = sampler.sample_prompts(_params(), PROMPTS, jax.random.key(0), cfg=TINY,
                                 sampling=sampling,
                                 toolbox=tools.toolbox(TOK, sampling, TINY.vocab_size))
    assert _check_rows(out, TOK, sampling.max_new_tokens, fn=_raises) >= 6


def test_the_call_bound_leaves_later_calls_to_the_policy():
    sampling = _sampling(max_tool_calls=1, max_new_tokens=32)
    box = tools.toolbox(TOK, sampling, TINY.vocab_size)
    out = sampler.sample_prompts(_params(), PROMPTS, jax.random.key(0), cfg=TINY,
                                 sampling=sampling, toolbox=box)
    _check_rows(out, TOK, sampling.max_new_tokens)
    assert out.tool_calls.max() == 1
    table = np.asarray(box.table)
    later = 0
    for r in np.flatnonzero(out.tool_calls == 1):
        (a, b), = _spans(out.policy_mask[r], int(out.lengths[r]))
        state = 0
        for t in out.tokens[r, b:out.lengths[r]]:  # after the answered call: policy only
            later += int(table[state, t] == -1)
            state = max(table[state, t], 0)
        assert out.policy_mask[r, b:out.lengths[r]].all()
    assert later > 0  # some row did complete a second call, and got no result
    with pytest.raises(ValueError, match="one tool"):
        SamplerConfig(tools=("calculator", "calculator"))
    with pytest.raises(ValueError, match="markers"):
        SamplerConfig(tool_call=("<<", "", ">>"))
    with pytest.raises(ValueError, match="unknown tool"):
        tools.toolbox(TOK, SamplerConfig(tools=("abacus",)), TINY.vocab_size)


def test_results_tokenize_alone_as_in_context(embedded_tokenizer):
    """With Gemma's tokenizer a result's own tokens are how the whole text tokenizes, so
    the sampler's insertion (the result encoded alone) is the in-context encoding. The
    one exception found: a negative result, whose '-' Gemma merges with '=' ('=-' is one
    token) when the text is encoded whole; the policy's '=' is already written by then,
    and SFT encodes its targets piece by piece, so training and sampling still agree."""
    def pieces(call, result):
        return (embedded_tokenizer.encode(call, add_bos=False)
                + embedded_tokenizer.encode(result, add_bos=False))

    for call, result in [("<<28*4=", "112>>"), ("a total of <<776.0-1.1=", "774.9>>"),
                         ("<<10/3=", "3.333333>>"), ("<<0.5*3=", "1.5>>"),
                         ("<<5/0=", "error: division by zero>>"), ("<<1+1=", "2>> apples")]:
        whole = embedded_tokenizer.encode(call + result, add_bos=False)
        assert whole == pieces(call, result), (call, result)
    negative = embedded_tokenizer.encode("<<2-5=-3>>", add_bos=False)
    assert negative != pieces("<<2-5=", "-3>>")
    assert embedded_tokenizer.decode(pieces("<<2-5=", "-3>>")) == "<<2-5=-3>>"


# ---------------------------------------------------------------------------
# The loss with tool tokens masked


def _compact(x, keep):
    """Each row's kept positions moved to its front, the rest padding (mask False)."""
    out = np.zeros_like(x)
    for i in range(x.shape[0]):
        kept = x[i][keep[i]]
        out[i, :len(kept)] = kept
    return out


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
@pytest.mark.parametrize("kl_estimator,ratio_level", [("k3", "token"), ("k2", "sequence")])
def test_masked_loss_equals_a_restatement_without_the_tool_tokens(aggregation, kl_estimator,
                                                                  ratio_level):
    rng = np.random.default_rng(4)
    n, t = 6, 9
    logp = -3.0 * rng.random((n, t))
    old = logp + 0.3 * rng.standard_normal((n, t))
    ref = logp + 0.5 * rng.standard_normal((n, t))
    adv = rng.standard_normal(n)
    mask = np.arange(t)[None, :] < rng.integers(1, t + 1, n)[:, None]
    policy = rng.random((n, t)) < 0.6
    policy[0] = False  # a row the tool wrote entirely
    keep = mask & policy
    kw = dict(aggregation=aggregation, kl_estimator=kl_estimator, ratio_level=ratio_level)
    batch = update.Batch(tokens=np.zeros((n, 2 + t), np.int32),
                         input_mask=np.concatenate([np.ones((n, 2), bool), mask], 1),
                         policy_mask=policy, prompt_len=2)
    np.testing.assert_array_equal(batch.completion_mask, keep)

    def loss(lp, o, r):
        return grpo.policy_loss(lp, o, r, jnp.asarray(adv, jnp.float32),
                                jnp.asarray(batch.completion_mask), epsilon_low=0.2,
                                epsilon_high=0.28, beta=0.07, **kw)[0]

    f32 = [jnp.asarray(x, jnp.float32) for x in (logp, old, ref)]
    got = float(loss(*f32))
    # The tool's tokens dropped, each row compacted (seq-mean-token-sum-norm keeps the
    # [N, T] normaliser: its padding is the same width).
    want = np_policy_loss(*(_compact(x, keep) for x in (logp, old, ref)), adv,
                          _compact(keep, keep), eps_low=0.2, eps_high=0.28, beta=0.07, **kw)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    # A tool token's log-probs (policy, old, reference) change nothing: loss and gradient.
    grad = jax.grad(loss)(*f32)
    moved = [np.where(mask & ~policy, x + rng.standard_normal(x.shape), x)
             for x in (logp, old, ref)]
    moved32 = [jnp.asarray(x, jnp.float32) for x in moved]
    assert float(loss(*moved32)) == got
    np.testing.assert_array_equal(np.asarray(jax.grad(loss)(*moved32)), np.asarray(grad))
    assert not np.asarray(grad)[~keep].any()
    # The k1 penalty sums the policy's tokens only.
    penalty = np.asarray(grpo.kl_reward_penalty(f32[0], f32[2], jnp.asarray(keep), 0.5))
    np.testing.assert_allclose(penalty, 0.5 * np.where(keep, logp - ref, 0).sum(1), rtol=1e-5,
                               atol=1e-6)


def test_update_ignores_what_the_tool_wrote():
    """The full update program: log-probs recorded for tool tokens (reference, sampler)
    change nothing, and the update with an all-True policy mask is the plain update."""
    rng = np.random.default_rng(1)
    params = gemma3.init_params(TINY, jax.random.key(0))
    from grpo_jax.model import lora as lora_lib
    from grpo_jax.model.config import LoraConfig

    lora = lora_lib.init_lora(TINY, LoraConfig(rank=4, alpha=8.0), jax.random.key(1))
    lora = jax.tree.map(lambda x: x + 0.05, lora)  # non-zero B: the policy differs from ref
    g = GRPOConfig(num_prompts=2, group_size=2, logprob_chunk=16)
    fns = update.build_update(TINY, g, OptimizerConfig(), 10)
    n, p, t = 4, 4, 8
    prompt = rng.integers(3, 200, (2, p)).astype(np.int32)
    completion = rng.integers(3, 200, (n, t)).astype(np.int32)
    lengths = np.array([8, 5, 7, 3])
    policy = rng.random((n, t)) < 0.6
    adv = np.array([1.0, -1.0, 0.5, -0.5], np.float32)

    def run(policy_mask, ref_shift=0.0):
        host = update.teacher_forced_batch(prompt, np.ones_like(prompt, bool), completion,
                                           lengths, 2, np.zeros((n, t), np.float32), adv,
                                           policy_mask)
        batch = jax.tree.map(jnp.asarray, host)
        ref = fns.batch_logprobs(params, None, batch)
        if ref_shift:
            ref = jnp.where(jnp.asarray(~policy), ref + ref_shift, ref)
        batch = batch.replace(ref_logprobs=ref)
        state, metrics = fns.update(params, fns.init_state(jax.tree.map(jnp.copy, lora)), batch)
        return jax.device_get((state.lora, metrics))

    (a, ma), (b, mb) = run(policy), run(policy, ref_shift=3.0)
    assert ma["finite"] and ma["grad_norm"] > 0
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert ma["loss"] == mb["loss"] and ma["kl_mean"] == mb["kl_mean"]
    (c, mc), (d, md) = run(np.ones((n, t), bool)), run(None)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), c, d)
    assert float(mc["loss"]) == pytest.approx(float(md["loss"]), rel=1e-6)


# ---------------------------------------------------------------------------
# SFT targets with calls


SOLUTION = ("John will be able to place a total of 28 x 4 = 112 bananas.\n"
            "Therefore, there are 132 - 112 = 20 bananas left, and 10 / 3 = 3.33 each.")


def test_gold_steps_become_calls_and_only_the_policy_tokens_are_targets():
    text = tools.with_calls(SOLUTION)
    assert text == ("John will be able to place a total of <<28*4=112>> bananas.\n"
                    "Therefore, there are <<132-112=20>> bananas left, and 10 / 3 = 3.33 each.")
    assert tools.with_calls(SOLUTION, max_calls=1).count("<<") == 1
    cfg = dataclasses.replace(
        TRAIN_PRESETS["cpu-270m"],
        sampler=dataclasses.replace(TRAIN_PRESETS["cpu-270m"].sampler, tools=("calculator",)))
    problem = Problem("q", "20", 0, SOLUTION)
    ids, policy = sft.target_tokens(cfg, TOK, problem)
    full = TOK.decode(ids)
    assert full == f"{text}</reasoning>\n<answer>20</answer>"  # prefill '<reasoning>' held back
    tool_text = TOK.decode([i for i, k in zip(ids, policy) if not k])
    assert tool_text == "112>>20>>"
    assert ids[-1] == cfg.sampler.stop_ids[0] and policy[-1]
    with pytest.raises(ValueError, match="needs --sampler.tools"):
        dataclasses.replace(TRAIN_PRESETS["cpu-270m"], sft=dataclasses.replace(
            cfg.sft, tool_results=True))
    # sft.tool_results: the same tokens, every one a target
    both = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, tool_results=True))
    assert sft.target_tokens(both, TOK, problem) == (ids, [True] * len(ids))
    # Packed and unpacked batches train on the same tokens.
    problems = [problem, Problem("r", "7", 1, "3 + 4 = 7 apples.")]
    trained = sum(sum(sft.target_tokens(cfg, TOK, p)[1]) for p in problems)
    for pack in (0, 512):
        run = dataclasses.replace(cfg, sft=dataclasses.replace(
            cfg.sft, steps=1, batch_size=2, max_tokens=256, pack_length=pack))
        shapes, fits = sft.run_shapes(run, TOK, problems)
        assert len(fits) == 2
        batch = sft.sft_batch(run, TOK, fits, 1, shapes)
        assert int(batch.completion_mask.sum()) == trained, pack


# ---------------------------------------------------------------------------
# A run with the tool


def test_tool_run_resumes_equal_and_evaluates_both_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(load, "ByteTokenizer", CallTokenizer)
    tiny = TRAIN_PRESETS["tiny"]
    full = dataclasses.replace(
        tiny, tensorboard=False, output_dir=str(tmp_path / "full"), steps=4, save_every=2,
        eval_problems=2, sampler=dataclasses.replace(tiny.sampler, tools=("calculator",)))
    train.train(full)
    half = dataclasses.replace(full, output_dir=str(tmp_path / "half"))
    stopped_then_resumed(half, monkeypatch, 3,
                         lambda: monkeypatch.setattr(load, "ByteTokenizer", CallTokenizer))
    a, b = _rows(tmp_path / "full"), _rows(tmp_path / "half")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("reward/mean", "loss", "kl", "completion_len/mean", "tool/calls_mean",
                    "tool/token_frac"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-5), (ra["step"], key)
    assert all(r["tool/calls_mean"] > 0 for r in a[2:])  # the resumed steps used the tool
    evals = json.loads((tmp_path / "full" / "eval.json").read_text())
    for column in ("base", "trained"):
        assert "tool_calls_mean" not in evals[column]
        assert "tool_calls_mean" in evals[column + "_tool"]
        assert evals["steps"][column + "_tool"] == evals["steps"][column]
    assert evals["setup"]["tools"]["tools"] == ["calculator"]
    # what the tool adds to the trained policy, paired on the same problems
    assert set(evals["comparison_tool"]["exact"]) >= {"gained", "lost", "p"}
