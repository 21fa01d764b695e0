"""The safetensors file format, read lazily through a memory map and written tensor by tensor.

A file is: 8 bytes little-endian u64 N, then N bytes of JSON header, then the data. The header maps
each tensor name to {"dtype": "BF16" | "F8_E4M3" | ..., "shape": [...], "data_offsets": [begin,
end]} (byte offsets into the data, row-major, little-endian), plus an optional "__metadata__"
dict of strings. The `safetensors` package's numpy API cannot return bfloat16 or float8 arrays
(numpy has no such dtypes), so this module reads the format itself and views the bytes with
ml_dtypes' types: a tensor costs no memory until its pages are touched.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from typing import Callable, Iterable, NamedTuple

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20  # the reference implementation's limit
if sys.byteorder != "little":  # the format is little-endian; views and writes here are native
    raise ImportError("jax_ds.models._safetensors supports little-endian hosts only")


class TensorInfo(NamedTuple):
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """One .safetensors file: `keys()`, `info(name)`, and `get(name)`, a read-only view."""

    def __init__(self, path):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ValueError(f"{self.path}: not a safetensors file (header length {n}, "
                                 f"file size {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{self.path}: not a safetensors file (its {n}-byte header is "
                                 f"not JSON: {err})") from None
            if not isinstance(header, dict):
                raise ValueError(f"{self.path}: not a safetensors file (header is not an object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._tensors: dict[str, TensorInfo] = {}
        for name, h in header.items():
            if not (isinstance(h, dict) and {"dtype", "shape", "data_offsets"} <= h.keys()
                    and isinstance(h["dtype"], str) and isinstance(h["shape"], list)
                    and isinstance(h["data_offsets"], list)
                    and len(h["data_offsets"]) == 2
                    and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                            for d in h["shape"] + h["data_offsets"])):
                raise ValueError(f"{self.path}: tensor {name!r} has a malformed header entry "
                                 f"{h!r} (expected dtype, shape [ints >= 0] and data_offsets "
                                 "[begin, end])")
            if h["dtype"] not in DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has dtype {h['dtype']!r}, not "
                                 f"one of {sorted(DTYPES)}")
            dtype, shape = DTYPES[h["dtype"]], tuple(h["shape"])
            begin, end = (8 + n + o for o in h["data_offsets"])
            if end - begin != math.prod(shape) * dtype.itemsize or end > size:
                raise ValueError(f"{self.path}: tensor {name!r} ({h['dtype']} {list(shape)}) "
                                 f"has {end - begin} bytes at [{begin}, {end}) of a {size}-byte "
                                 "file")
            self._tensors[name] = TensorInfo(dtype, shape, begin, end)
        self._map = None

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        return self._tensors[name]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy array backed by the file (nothing is read yet)."""
        t = self._tensors[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return np.ndarray(t.shape, t.dtype, buffer=self._map, offset=t.begin)


class Entry(NamedTuple):
    """A tensor to write: its name, dtype and shape, and a function that makes it (called once)."""
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]


def write(path, entries: Iterable[Entry], metadata: dict[str, str] | None = None) -> int:
    """Writes one safetensors file, holding one tensor in host memory at a time.

    Returns the number of data bytes written.
    """
    entries = list(entries)
    header, offset = {}, 0
    for e in entries:
        dtype = np.dtype(e.dtype)
        if dtype not in NAMES:
            raise ValueError(f"safetensors: tensor {e.name!r} has dtype {dtype}, not storable")
        nbytes = math.prod(e.shape) * dtype.itemsize
        header[e.name] = {"dtype": NAMES[dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header = {"__metadata__": dict(metadata), **header}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for e in entries:
            array = np.ascontiguousarray(e.make())
            if array.dtype != np.dtype(e.dtype) or tuple(array.shape) != tuple(e.shape):
                raise ValueError(f"safetensors: tensor {e.name!r} came out {array.dtype} "
                                 f"{list(array.shape)}, declared {np.dtype(e.dtype)} "
                                 f"{list(e.shape)}")
            f.write(array.tobytes())  # little-endian hosts only (checked at import)
    return offset
