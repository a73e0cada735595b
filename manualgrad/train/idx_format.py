"""The IDX file format, MNIST's: an array in one file, raw or gzip-compressed.

The format: two zero bytes, a type code (:data:`IDX_TYPES`), the number of dimensions, each
dimension as a big-endian int32, then the elements in C order, big-endian.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from manualgrad.train.errors import DataError

# IDX type code -> big-endian element type.
IDX_TYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in an IDX file, raw or gzip-compressed (recognised by its content).

    The format: two zero bytes, a type code (:data:`IDX_TYPES`), the number of dimensions,
    each dimension as a big-endian int32, then the elements in C order, big-endian.
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a readable gzip file ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_TYPES:
        raise DataError(
            f"{path}: not an IDX file: bad magic number {raw[:4].hex(' ') or '(empty file)'}, expected "
            f"00 00 <type> <ndim> with type one of {', '.join(f'{t:02x}' for t in IDX_TYPES)}"
        )
    dtype, ndim = IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header: {ndim} dimensions need {header} bytes, the file has {len(raw)}")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", ndim, 4))
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "too long"
        raise DataError(
            f"{path}: {state}: the header says {dtype.newbyteorder('=')} of shape {dims}, which is "
            f"{expected} bytes with the header, but the file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes ``array`` as an IDX file, gzip-compressed when ``path`` ends in ``.gz``."""
    array = np.asarray(array)
    types = {dtype.newbyteorder("="): code for code, dtype in IDX_TYPES.items()}
    if array.dtype not in types or not 1 <= array.ndim <= 255:
        raise DataError(
            f"write_idx: IDX holds arrays of 1 to 255 dimensions of {', '.join(str(t) for t in types)}; "
            f"got {array.dtype} of shape {array.shape}"
        )
    code = types[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    content = header + np.ascontiguousarray(array, IDX_TYPES[code]).tobytes()
    if os.fspath(path).endswith(".gz"):
        content = gzip.compress(content, mtime=0)
    Path(path).write_bytes(content)
