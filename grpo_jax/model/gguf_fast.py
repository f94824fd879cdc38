"""The `gguf` package's reader and Q8_0 dequantizer, minus their per-element Python.

`gguf.GGUFReader` builds every metadata array element by element (a handful of numpy
calls each): Gemma's 262,144-entry vocabulary (pieces, scores, types) took 10-13 s to
open, more than the forward passes of most tests that load it. `gguf.quants` dequantizes
Q8_0 sixteen rows at a time: the embedded 270M's tied embedding (262,144 rows) took
14 s. Both are restated here with the same results (tests/test_weights.py checks field
for field and bit for bit against the package): same `ReaderField` parts, indices and
types, same float32 values.
"""
from __future__ import annotations

import sys

import gguf
import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType


class FastGGUFReader(gguf.GGUFReader):
    """`gguf.GGUFReader` with arrays of strings and scalars parsed in one pass."""

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if (GGUFValueType(raw_type) != GGUFValueType.ARRAY or self.byte_order != "I"
                or sys.byteorder != "little"):
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype, count, offs = GGUFValueType(raw_itype[0]), int(alen[0]), orig_offs + 12
        parts: list[np.ndarray] = [raw_itype, alen]
        types = [GGUFValueType.ARRAY] + ([itype] if count else [])
        if itype == GGUFValueType.STRING:
            # Slices of a plain ndarray view: np.memmap's own slicing costs ~5 us a slice.
            data, u64 = self.data.view(np.ndarray), np.dtype(np.uint64)
            raw = memoryview(data)
            for _ in range(count):
                n = int.from_bytes(raw[offs:offs + 8], "little")
                parts.append(data[offs:offs + 8].view(u64))
                parts.append(data[offs + 8:offs + 8 + n])
                offs += 8 + n
            if offs > len(data):
                raise ValueError("GGUF string array runs past the end of the file")
            return offs - orig_offs, parts, list(range(3, 2 + 2 * count, 2)), types
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is None:  # nested arrays: the package's own path
            return super()._get_field_parts(orig_offs, raw_type)
        values = self._get(offs, nptype, count).view(np.ndarray)
        if len(values) != count:
            raise ValueError("GGUF array runs past the end of the file")
        parts += list(values.reshape(count, 1))  # one 1-element view per entry, as gguf's
        return 12 + int(values.nbytes), parts, list(range(2, 2 + count)), types


_Q8_0_BLOCK = 2 + 32  # a float16 scale, then 32 int8 quants
_ROWS_A_CHUNK = 1 << 16  # bounds the float32 temporaries (~8 MB of blocks a chunk)


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """`gguf.quants.dequantize`, with Q8_0 vectorised over the whole tensor."""
    if qtype != GGMLQuantizationType.Q8_0:
        return gguf.quants.dequantize(data, qtype)
    rows = np.asarray(data, np.uint8)
    if rows.shape[-1] % _Q8_0_BLOCK:
        raise ValueError(f"Q8_0 rows of {rows.shape[-1]} bytes: not whole blocks")
    blocks = rows.reshape(-1, _Q8_0_BLOCK)
    out = np.empty((blocks.shape[0], 32), np.float32)
    for start in range(0, blocks.shape[0], _ROWS_A_CHUNK):
        b = blocks[start:start + _ROWS_A_CHUNK]
        scale = np.ascontiguousarray(b[:, :2]).view(np.float16).astype(np.float32)
        np.multiply(b[:, 2:].view(np.int8), scale, out=out[start:start + _ROWS_A_CHUNK])
    return out.reshape(*rows.shape[:-1], rows.shape[-1] // _Q8_0_BLOCK * 32)
