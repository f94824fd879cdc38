"""Gemma's sentencepiece tokenizer: from a `tokenizer.model`, or rebuilt from a GGUF vocabulary.

Gemma tokenizes with byte-fallback BPE over the whole text (no dummy prefix, no whitespace
normalisation; a space is spelled "▁"). A GGUF file carries no `tokenizer.model`, only the pieces,
their scores and their llama.cpp token types, so `Tokenizer.from_gguf` rebuilds a sentencepiece
`ModelProto` from those in memory. Three things need care to reproduce what `transformers`
builds from the same file (its GGUF Gemma builder), which the tests check id for id:

1. Runs of spaces ("  ", "   ", ...) are stored with raw spaces and marked user-defined, but
   sentencepiece escapes " " to "▁" before it matches anything, so a piece spelled "  " can never
   match. They are respelled "▁▁", ... and made ordinary BPE pieces: `transformers` reaches them
   through merges (40 spaces become 16 + 24, not greedy 31 + 9), and so does sentencepiece then.
2. Merge priority. Sentencepiece merges the adjacent pair whose result scores highest;
   `transformers` ranks merges by the merged piece's position in the vocabulary. Every ordinary
   piece therefore gets score -id (for Gemma's GGUF this is the file's own order: its scores are
   0, -1, -2, ... from id 494 on, but the respelled space runs at ids 138..167 carry -1000).
3. Control tokens (`<start_of_turn>`, `<end_of_turn>`, `<bos>`, `<unused0>`, ...) are matched
   whole in raw text, as `transformers` does with its special tokens. Sentencepiece never matches
   CONTROL pieces in text, so `encode` cuts the text at them first and encodes the pieces between
   (which is exact: there is no dummy prefix and no normalisation that looks across a cut).
   The other user-defined pieces ("\\n", "\\n\\n", "\\t", "<b>", ...) stay USER_DEFINED, which
   sentencepiece matches longest-first in the text, as `transformers` does with its added tokens.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3
START_OF_TURN_ID = 105
END_OF_TURN_ID = 106
# Generation stops at either: base models end with <eos>, instruction-tuned turns with <end_of_turn>.
STOP_IDS = (EOS_ID, END_OF_TURN_ID)

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"

# llama.cpp's token types (gguf.TokenType).
_GGUF_NORMAL, _GGUF_UNKNOWN, _GGUF_CONTROL, _GGUF_USER_DEFINED, _GGUF_UNUSED, _GGUF_BYTE = 1, 2, 3, 4, 5, 6

_REQUIRED_GGUF_FIELDS = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type")


def chat_prompt(user_text: str) -> str:
    """One user turn in Gemma's chat format, ending where the model's reply begins.

    Encode it with `add_bos=True`: the template itself does not write `<bos>`.
    """
    return f"{START_OF_TURN}user\n{user_text}{END_OF_TURN}\n{START_OF_TURN}model\n"


def _require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


class Tokenizer:
    """A `sentencepiece.SentencePieceProcessor` plus whole-token matching of control tokens."""

    def __init__(self, processor: Any, *, source: str = "<memory>"):
        self._sp = processor
        self.source = source
        n = processor.get_piece_size()
        # Control and unknown pieces are "special": matched whole in text by `encode`, rendered or
        # dropped by `decode`. (Sentencepiece itself neither matches nor renders CONTROL pieces.)
        self._special_ids = frozenset(
            i for i in range(n) if processor.is_control(i) or processor.is_unknown(i))
        specials = {processor.id_to_piece(i): i for i in self._special_ids}
        self._special_by_text = {text: i for text, i in specials.items() if text}
        self._special_re = _literal_alternation(self._special_by_text)
        self.pad_id = _id_or(processor.pad_id(), PAD_ID)
        self.eos_id = _id_or(processor.eos_id(), EOS_ID)
        self.bos_id = _id_or(processor.bos_id(), BOS_ID)
        self.unk_id = processor.unk_id()
        self._token_bytes: list[bytes] | None = None

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a sentencepiece `tokenizer.model` (as official Gemma checkpoints ship)."""
        path = _require_file(path, "tokenizer model")
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(path.read_bytes())
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with a terse message
            raise ValueError(f"cannot load sentencepiece model {path}: {e}") from None
        return cls(processor, source=str(path))

    @classmethod
    def from_model_proto(cls, proto: Any, *, source: str = "<memory>") -> "Tokenizer":
        """From a `sentencepiece_model_pb2.ModelProto` (or its serialized bytes)."""
        data = proto if isinstance(proto, (bytes, bytearray)) else proto.SerializeToString()
        processor = spm.SentencePieceProcessor()
        processor.LoadFromSerializedProto(bytes(data))
        return cls(processor, source=source)

    @classmethod
    def from_gguf(cls, path_or_reader: Any) -> "Tokenizer":
        """Rebuild the tokenizer a GGUF file describes (a path, or an open `gguf.GGUFReader`)."""
        if isinstance(path_or_reader, (str, os.PathLike)):
            from grpo_jax.model.gguf_fast import FastGGUFReader

            path = _require_file(path_or_reader, "GGUF file")
            try:
                reader = FastGGUFReader(str(path))
            except Exception as e:  # the reader raises assorted errors on a bad file
                raise ValueError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from None
            source = str(path)
        else:
            reader = path_or_reader
            source = str(getattr(reader, "path", "<GGUFReader>"))
        proto = model_proto_from_gguf(reader, source=source)
        return cls.from_model_proto(proto, source=source)

    def model_proto(self) -> Any:
        """The sentencepiece `ModelProto` in use (write `.SerializeToString()` to get a tokenizer.model)."""
        proto = pb.ModelProto()
        proto.ParseFromString(self._sp.serialized_model_proto())
        return proto

    # ---- encoding and decoding ----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special_ids

    def id_to_piece(self, token_id: int) -> str:
        self._check_id(token_id)
        return self._sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, control tokens such as `<start_of_turn>` matched whole.

        `add_bos` puts `<bos>` first, as Gemma expects at the start of every sequence.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = [self.bos_id] if add_bos else []
        start = 0
        if self._special_re is not None:
            for m in self._special_re.finditer(text):
                if m.start() > start:
                    ids.extend(self._sp.encode(text[start:m.start()]))
                ids.append(self._special_by_text[m.group()])
                start = m.end()
        if start < len(text):
            ids.extend(self._sp.encode(text[start:]))
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`.

        Special tokens (control and unknown: `<bos>`, `<eos>`, `<end_of_turn>`, ...) are dropped by
        default, so `decode(encode(text)) == text`; with `skip_special_tokens=False` they are written
        out as their text, as `transformers`' `decode(ids, skip_special_tokens=False)` does.
        """
        ids = [int(i) for i in ids]
        for i in ids:
            self._check_id(i)
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if i not in self._special_ids])
        out, run = [], []
        for i in ids:
            if i in self._special_ids:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def token_bytes(self) -> list[bytes]:
        """The UTF-8 bytes each id adds to decoded text (b"" for special ids; a
        byte-fallback piece is its one byte): what stop strings are matched on."""
        if self._token_bytes is None:
            sp = self._sp
            self._token_bytes = [
                b"" if i in self._special_ids
                else bytes([int(sp.id_to_piece(i)[3:-1], 16)]) if sp.is_byte(i)
                else sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")
                for i in range(self.vocab_size)]
        return self._token_bytes

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


def _id_or(token_id: int, default: int) -> int:
    return token_id if token_id >= 0 else default


def _literal_alternation(strings: Iterable[str]) -> re.Pattern | None:
    """A regex matching any of `strings`, longest first where several start at the same place."""
    strings = sorted(set(strings), key=lambda s: (-len(s), s))
    return re.compile("|".join(map(re.escape, strings))) if strings else None


# ---- GGUF -> sentencepiece ModelProto ---------------------------------------------------------

def _gguf_value(reader: Any, name: str, default: Any = None) -> Any:
    field = reader.fields.get(name)
    return default if field is None else field.contents()


def _is_space_run(piece: str) -> bool:
    return bool(piece) and set(piece) == {" "}


def model_proto_from_gguf(reader: Any, *, source: str = "GGUF file") -> Any:
    """A sentencepiece BPE `ModelProto` from a GGUF file's `tokenizer.ggml.*` metadata.

    See the module docstring for how pieces are typed and scored.
    """
    fields = getattr(reader, "fields", None)
    if fields is None:
        raise TypeError(f"expected a path or a gguf.GGUFReader, got {type(reader).__name__}")
    missing = [name for name in _REQUIRED_GGUF_FIELDS if name not in fields]
    if missing:
        raise ValueError(f"{source} has no tokenizer: missing GGUF field(s) {', '.join(missing)}")
    model = _gguf_value(reader, "tokenizer.ggml.model")
    if model != "llama":
        raise ValueError(f"{source}: tokenizer.ggml.model is {model!r}; only sentencepiece "
                         "vocabularies ('llama', as Gemma's) can be rebuilt")
    tokens: Sequence[str] = _gguf_value(reader, "tokenizer.ggml.tokens")
    types = [int(t) for t in _gguf_value(reader, "tokenizer.ggml.token_type")]
    if len(types) != len(tokens):
        raise ValueError(f"{source}: {len(tokens)} tokens but {len(types)} token types")
    unk_id = _gguf_value(reader, "tokenizer.ggml.unknown_token_id")
    if unk_id is None:
        unk_id = tokens.index("<unk>") if "<unk>" in tokens else None
    if unk_id is None or not 0 <= unk_id < len(tokens):
        raise ValueError(f"{source}: missing GGUF field tokenizer.ggml.unknown_token_id "
                         "(and no '<unk>' piece)")

    T = pb.ModelProto.SentencePiece.Type
    by_gguf_type = {_GGUF_NORMAL: T.NORMAL, _GGUF_UNKNOWN: T.UNKNOWN, _GGUF_CONTROL: T.CONTROL,
                    _GGUF_USER_DEFINED: T.USER_DEFINED, _GGUF_UNUSED: T.UNUSED, _GGUF_BYTE: T.BYTE}
    proto = pb.ModelProto()
    for i, (piece, gtype) in enumerate(zip(tokens, types)):
        kind = by_gguf_type.get(gtype)
        if kind is None:
            raise ValueError(f"{source}: token {i} ({piece!r}) has unknown token type {gtype}")
        if i == unk_id:
            kind = T.UNKNOWN
        elif kind == T.UNKNOWN:  # sentencepiece allows exactly one
            kind = T.CONTROL
        elif kind == T.USER_DEFINED and _is_space_run(piece):
            # Stored with raw spaces; sentencepiece sees "▁" by the time it matches, and
            # transformers reaches these by BPE merges, so they are ordinary pieces here.
            piece, kind = "\u2581" * len(piece), T.NORMAL
        # Merge priority follows vocabulary order (see the module docstring).
        score = -float(i) if kind == T.NORMAL else 0.0
        proto.pieces.add(piece=piece, score=score, type=kind)

    special = {"pad": _gguf_value(reader, "tokenizer.ggml.padding_token_id"),
               "bos": _gguf_value(reader, "tokenizer.ggml.bos_token_id"),
               "eos": _gguf_value(reader, "tokenizer.ggml.eos_token_id")}
    ts = proto.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = True
    ts.unk_id, ts.unk_piece = unk_id, tokens[unk_id]
    for name, token_id in special.items():
        ok = token_id is not None and 0 <= token_id < len(tokens)
        setattr(ts, f"{name}_id", int(token_id) if ok else -1)
        if ok:
            setattr(ts, f"{name}_piece", tokens[token_id])
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(_gguf_value(reader, "tokenizer.ggml.add_space_prefix", False))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return proto


class ByteTokenizer:
    """UTF-8 bytes as ids 3..258 (PAD 0, EOS 1, BOS 2): the tokenizer of the random
    `tiny` model, whose 512-token vocabulary cannot hold Gemma's ids. Same
    encode/decode interface as `Tokenizer`."""

    OFFSET = 3
    pad_id, eos_id, bos_id = PAD_ID, EOS_ID, BOS_ID
    vocab_size = 256 + OFFSET
    source = "bytes"
    # Ids past the bytes (the tiny model's vocabulary is larger) decode to nothing.
    decodes_unknown_ids = True

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return ([self.bos_id] if add_bos else []) + [b + self.OFFSET for b in text.encode()]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        data = bytes(int(i) - self.OFFSET for i in ids if int(i) >= self.OFFSET
                     and int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self) -> list[bytes]:
        return [b""] * self.OFFSET + [bytes([b]) for b in range(256)]

    def __repr__(self) -> str:
        return "ByteTokenizer()"
