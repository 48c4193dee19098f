"""The tensor table of a GGUF file (name, GGML type, shape, stored bytes) from its header alone.

Why not gguf-py's `GGUFReader`, which qlib uses for everything else in a GGUF file: it turns every key/value item
into numpy views on open, so a file's vocabulary (49k tokens and 49k merges for SmolLM2, 151k tokens for Qwen2)
costs 6-36 s here before the tensor table can be read, once per file written. This walks the header (GGUF v2/v3,
little-endian: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), stepping over the values, and takes the
block sizes of each type from gguf-py's `GGML_QUANT_SIZES`; tests/test_gguf.py holds it against `GGUFReader`.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlib.core.errors import QlabError

_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    type: str                  # GGML type name, e.g. Q4_0
    shape: tuple[int, ...]     # as GGUF stores it (fastest-varying dimension first)
    n_elements: int
    n_bytes: int


class _Cursor:
    def __init__(self, buf: Any) -> None:
        self.buf, self.at = buf, 0

    def take(self, fmt: str) -> tuple[Any, ...]:
        out = struct.unpack_from("<" + fmt, self.buf, self.at)
        self.at += struct.calcsize("<" + fmt)
        return out

    def string(self) -> bytes:
        (n,) = self.take("Q")
        self.at += n
        return bytes(self.buf[self.at - n:self.at])

    def skip_value(self, kind: int) -> None:
        if kind in _SCALAR:
            self.at += _SCALAR[kind]
        elif kind == _STRING:
            self.string()
        elif kind == _ARRAY:
            item, count = self.take("IQ")
            if item in _SCALAR:
                self.at += _SCALAR[item] * count
            else:
                for _ in range(count):
                    self.skip_value(item)
        else:
            raise ValueError(f"unknown value type {kind}")


def tensor_table(path: str | Path, quant_sizes: dict[Any, tuple[int, int]], type_names: Any) -> dict[str, TensorInfo]:
    """Tensor name -> its type, shape, elements and stored bytes (`quant_sizes`: gguf-py's GGML_QUANT_SIZES,
    `type_names`: its GGMLQuantizationType); a file that is not GGUF is one clear error."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            c = _Cursor(buf)
            magic, version = c.take("4sI")
            if magic != b"GGUF" or version not in (2, 3):
                raise ValueError(f"not a little-endian GGUF v2/v3 file (magic {magic!r}, version {version})")
            n_tensors, n_kv = c.take("QQ")
            align = 32  # GGUF's default; `general.alignment` may say otherwise
            for _ in range(n_kv):
                key, kind = c.string(), c.take("I")[0]
                if key == b"general.alignment" and kind == 4:
                    (align,) = c.take("I")
                else:
                    c.skip_value(kind)
            out, ends = {}, []
            for _ in range(n_tensors):
                name = c.string().decode("utf-8")
                (n_dims,) = c.take("I")
                shape = c.take("Q" * n_dims)
                kind, offset = c.take("IQ")
                ggml = type_names(kind)
                block, size = quant_sizes[ggml]
                n = 1
                for d in shape:
                    n *= d
                out[name] = TensorInfo(ggml.name, tuple(shape), n, n // block * size)
                ends.append((offset + out[name].n_bytes, name))
            _check_length(path, len(buf), -(-c.at // align) * align, ends)
            return out
    except struct.error:
        raise QlabError(f"{path} is truncated: its header ends past the end of the file ({Path(path).stat().st_size:,} "
                        "bytes)") from None
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
        raise QlabError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from None


def _check_length(path: str | Path, size: int, data_start: int, ends: list[tuple[int, str]]) -> None:
    """Every tensor's bytes lie inside the file: a copy cut short is named as truncated."""
    if ends:
        end, name = max(ends)
        if data_start + end > size:
            raise QlabError(f"{path} is truncated: tensor {name} ends at byte {data_start + end:,}, the file has "
                            f"{size:,}")
