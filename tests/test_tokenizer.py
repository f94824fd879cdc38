"""The tokenizer: ids equal to transformers' for the embedded GGUF, round trips, loading, errors."""
from __future__ import annotations

import re

import numpy as np
import pytest

from grpo_jax.tokenizer import (BOS_ID, END_OF_TURN_ID, EOS_ID, PAD_ID, START_OF_TURN_ID, STOP_IDS,
                                Tokenizer, chat_prompt)

GSM8K = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
         "in May. How many clips did Natalia sell altogether in April and May?")

# Ordinary text: decode(encode(text)) must give it back.
ORDINARY = {
    "prose": "The quick brown fox jumps over the lazy dog.",
    "digits": "0 1 2 3 4 5 6 7 8 9 10 42 007",
    "long_number": "12345678901234567890 and 3.14159265358979",
    "currency": "It costs $1,234.56, or €1.099,00, or £12.50 (¥1500).",
    "accents": "Café, naïve, façade, Ångström, Żółć, señor",
    "cjk": "北京欢迎你。日本語のテキスト。한국어 문장",
    "emoji": "Great job 🎉👍🏽 🧑‍💻 ❤️",
    "arabic": "مرحبا بالعالم، كيف حالك؟",
    "spaces_2_to_10": "".join(f"a{' ' * n}b" for n in range(2, 11)),
    "spaces_long_run": "x" + " " * 40 + "y" + " " * 33 + "z",
    "tabs": "col1\tcol2\t\tcol3\t\t\t end",
    "newline_1": "line one\nline two",
    "newline_2": "para one\n\npara two",
    "newline_3": "block\n\n\nnext",
    "mixed_ws": "a \n b\t \n\n  c \r\n d",
    "leading_spaces": "   leading",
    "trailing_spaces": "trailing   ",
    "single_space": " ",
    "xml_tags": "<reasoning>\n48 / 2 = 24\n48 + 24 = 72\n</reasoning>\n<answer>72</answer>",
    "html_tags": "<b>bold</b> <code>x</code> <table><tr><td>1</td></tr></table>",
    "code": ("def f(x: int) -> int:\n    \"\"\"Square.\"\"\"\n    return x ** 2  # ok\n\n\n"
             "for i in range(10):\n\tprint(f(i), end='')\n"),
    "gsm8k": GSM8K,
    "gsm8k_2": ("Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
                "babysitting. How much did she earn?"),
    "control_chars": "bell\x07 unit-sep\x1f nbsp\u00a0 zwsp\u200b",
}

# Text that does not round-trip: control tokens are matched whole (as transformers does) and
# decode drops them by default.
WITH_SPECIAL = {
    "chat": chat_prompt(GSM8K),
    "chat_turns": ("<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
                   "<start_of_turn>user\n  two  spaces\n\n<end_of_turn>\n"),
    "literal_specials": "<bos>x<eos>y<pad><unk><mask><unused0>",
    "near_specials": "<<start_of_turn>> <start_of_turn <end_of_turn>>",
    # A literal "▁" is sentencepiece's space symbol: it encodes as a space would and decodes as one
    # (in transformers too), so it does not round-trip.
    "sp_space_symbol": "\u2581 literal \u2581\u2581",
}

CORPUS = {**ORDINARY, **WITH_SPECIAL}


def test_constants_and_chat_prompt():
    assert (PAD_ID, EOS_ID, BOS_ID, START_OF_TURN_ID, END_OF_TURN_ID) == (0, 1, 2, 105, 106)
    assert STOP_IDS == (1, 106)
    assert chat_prompt("2+2?") == "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n"


def test_vocabulary(embedded_tokenizer):
    tok = embedded_tokenizer
    assert tok.vocab_size == 262144
    assert [tok.id_to_piece(i) for i in (PAD_ID, EOS_ID, BOS_ID, START_OF_TURN_ID, END_OF_TURN_ID)] == [
        "<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.id_to_piece(107) == "\n"
    assert tok.id_to_piece(138) == "\u2581\u2581"  # two spaces, respelled from the GGUF's raw "  "
    with pytest.raises(ValueError, match="out of range"):
        tok.id_to_piece(tok.vocab_size)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([5, -1])


def test_gguf_scores_follow_vocabulary_order(embedded_gguf_reader):
    """The proto scores ordinary pieces by -id; for this file that is the GGUF's own merge order."""
    types = np.asarray(embedded_gguf_reader.fields["tokenizer.ggml.token_type"].contents())
    scores = np.asarray(embedded_gguf_reader.fields["tokenizer.ggml.scores"].contents())
    normal = scores[types == 1]
    assert np.all(np.diff(normal) < 0)


def test_known_ids(embedded_tokenizer):
    """Pinned ids (from transformers) for the cases a naive GGUF -> sentencepiece build gets wrong."""
    enc = embedded_tokenizer.encode
    assert enc("a  b") == [BOS_ID, 236746, 138, 236763]  # a run of spaces is one piece
    assert enc("x" + " " * 40 + "y", add_bos=False) == [236781, 152, 160, 236762]  # 16+24, by BPE merges
    assert enc("\n\n\n \n", add_bos=False) == [109, 236743, 107]
    assert enc("<start_of_turn>user\nhi<end_of_turn>\n") == [BOS_ID, 105, 2364, 107, 2202, 106, 107]
    assert enc("Hello world") == [BOS_ID, 9259, 1902]
    assert enc("") == [BOS_ID] and enc("", add_bos=False) == []


def test_chat_prompt_encoding(embedded_tokenizer):
    ids = embedded_tokenizer.encode(chat_prompt("hi"))
    assert ids[:3] == [BOS_ID, START_OF_TURN_ID, embedded_tokenizer.piece_to_id("user")]
    assert ids.count(START_OF_TURN_ID) == 2 and ids.count(END_OF_TURN_ID) == 1
    assert embedded_tokenizer.id_to_piece(ids[-1]) == "\n"


@pytest.mark.parametrize("name", list(ORDINARY))
def test_round_trip(embedded_tokenizer, name):
    text = ORDINARY[name]
    assert embedded_tokenizer.decode(embedded_tokenizer.encode(text)) == text
    assert embedded_tokenizer.decode(embedded_tokenizer.encode(text, add_bos=False)) == text


def test_decode_special_tokens(embedded_tokenizer):
    tok = embedded_tokenizer
    ids = tok.encode(chat_prompt("hi"))
    assert tok.decode(ids) == "user\nhi\nmodel\n"
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>" + chat_prompt("hi")
    assert tok.decode([END_OF_TURN_ID, EOS_ID]) == ""


def test_from_file_matches_from_gguf(embedded_tokenizer, tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(embedded_tokenizer.model_proto().SerializeToString())
    loaded = Tokenizer.from_file(path)
    assert loaded.vocab_size == embedded_tokenizer.vocab_size
    assert loaded.special_ids == embedded_tokenizer.special_ids
    for text in CORPUS.values():
        ids = embedded_tokenizer.encode(text)
        assert loaded.encode(text) == ids
        assert loaded.decode(ids, skip_special_tokens=False) == embedded_tokenizer.decode(
            ids, skip_special_tokens=False)


def test_missing_files(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        Tokenizer.from_file(missing)
    with pytest.raises(FileNotFoundError, match="model.gguf"):
        Tokenizer.from_gguf(tmp_path / "model.gguf")


def test_not_a_tokenizer_model(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\x00not a sentencepiece model")
    with pytest.raises(ValueError, match="tokenizer.model"):
        Tokenizer.from_file(path)


# ---- small synthetic GGUF files: the path entry point and the errors ---------------------------

def _write_gguf(path, tokens=None, types=None, **ids):
    import gguf

    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name("tokenizer-test")
    if tokens is not None:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
    if types is not None:
        writer.add_token_types(types)
    for name, value in ids.items():
        getattr(writer, f"add_{name}_token_id")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny_vocab():
    # GGUF types: 1 normal, 3 control, 4 user-defined, 6 byte.
    pieces = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3), ("<start_of_turn>", 3),
              ("<end_of_turn>", 3), ("\n", 4), ("  ", 4), ("   ", 4)]
    pieces += [(f"<0x{b:02X}>", 6) for b in range(256)]
    pieces += [(p, 1) for p in ("\u2581", "a", "b", "c", "\u2581a", "ab", "\u2581ab", "abc")]
    return [p for p, _ in pieces], [t for _, t in pieces]


def test_from_gguf_path_tiny_vocabulary(tmp_path):
    tokens, types = _tiny_vocab()
    path = _write_gguf(tmp_path / "tiny.gguf", tokens, types, bos=2, eos=1, unk=3, pad=0)
    tok = Tokenizer.from_gguf(str(path))
    ids = {p: i for i, p in enumerate(tokens)}
    assert tok.vocab_size == len(tokens)
    # BPE merges the best-ranked (lowest id) pair first: ▁a, then ab, then ▁a+b; "▁abc" is no piece.
    assert tok.encode("ab abc") == [2, ids["ab"], ids["\u2581ab"], ids["c"]]
    assert tok.encode("<start_of_turn>a\n", add_bos=False) == [4, ids["a"], ids["\n"]]
    assert tok.encode("a   b", add_bos=False) == [ids["a"], ids["   "], ids["b"]]  # raw-space run
    assert tok.encode("z", add_bos=False) == [ids["<0x7A>"]]  # byte fallback
    assert tok.decode(tok.encode("ab  z\n")) == "ab  z\n"


def test_gguf_without_tokenizer(tmp_path):
    path = _write_gguf(tmp_path / "no_tokenizer.gguf")
    with pytest.raises(ValueError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_gguf(path)
    tokens, _ = _tiny_vocab()
    path = _write_gguf(tmp_path / "no_types.gguf", tokens)
    with pytest.raises(ValueError, match="tokenizer.ggml.token_type"):
        Tokenizer.from_gguf(path)


# ---- parity with transformers (skipped without it) ---------------------------------------------

def test_transformers_adds_bos(hf_embedded_tokenizer):
    assert hf_embedded_tokenizer("hi").input_ids[0] == BOS_ID
    assert hf_embedded_tokenizer("hi", add_special_tokens=False).input_ids[0] != BOS_ID


@pytest.mark.parametrize("name", list(CORPUS))
def test_ids_match_transformers(embedded_tokenizer, hf_embedded_tokenizer, name):
    text = CORPUS[name]
    ours = embedded_tokenizer.encode(text, add_bos=True)
    assert ours == hf_embedded_tokenizer(text).input_ids
    assert embedded_tokenizer.encode(text, add_bos=False) == hf_embedded_tokenizer(
        text, add_special_tokens=False).input_ids
    assert embedded_tokenizer.decode(ours, skip_special_tokens=False) == hf_embedded_tokenizer.decode(
        ours, skip_special_tokens=False)
    assert embedded_tokenizer.decode(ours) == hf_embedded_tokenizer.decode(ours, skip_special_tokens=True)


def test_ids_match_transformers_fuzz(embedded_tokenizer, hf_embedded_tokenizer):
    """Random mixes of vocabulary pieces, whitespace runs, control tokens, digits and unicode."""
    rng = np.random.default_rng(0)
    pieces = [embedded_tokenizer.id_to_piece(int(i)).replace("\u2581", " ")
              for i in rng.integers(0, embedded_tokenizer.vocab_size, 400)]
    extra = [" " * n for n in range(1, 36)] + ["\n" * n for n in range(1, 5)] + ["\t", "\t\t", " \n",
             "<start_of_turn>", "<end_of_turn>", "<answer>", "$1,234.56", "é", "北", "🎉", "\u2581"]
    pool = pieces + extra
    for _ in range(300):
        text = "".join(pool[j] for j in rng.integers(0, len(pool), rng.integers(1, 10)))
        assert embedded_tokenizer.encode(text) == hf_embedded_tokenizer(text).input_ids, repr(text)
