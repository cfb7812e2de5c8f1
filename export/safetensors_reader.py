"""Export stage 1 helper: read tensors from .safetensors files with plain reads, one at a time.

The safetensors library maps the whole file; every page it touches then counts in the process's
RSS until the file is closed, so exporting a 13 GB checkpoint "used" 13 GB. Reading each tensor's
byte range with pread keeps the resident set at about one tensor.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from llmpack.runtime.errors import CheckpointError

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
MAX_HEADER = 100 * 2**20


class SafetensorsFile:
    """The header of one .safetensors file, validated against the file size, and its tensors."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise self._corrupt("shorter than a safetensors header")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER, size - 8):
                raise self._corrupt(f"header length {length} does not fit the file")
            try:
                header = json.loads(handle.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise self._corrupt(f"header is not JSON ({exc})") from exc
        header.pop("__metadata__", None)
        self._data_start = 8 + length
        self._entries = header
        for name, entry in header.items():
            self._check_entry(name, entry, size - self._data_start)

    def _corrupt(self, why: str) -> CheckpointError:
        return CheckpointError(f"weight file {self.path} is corrupt or truncated ({why}); re-download it")

    def _check_entry(self, name: str, entry: dict, data_size: int) -> None:
        try:
            dtype = DTYPES[entry["dtype"]]
            begin, end = (int(v) for v in entry["data_offsets"])
            count = int(np.prod(entry["shape"], dtype=np.int64))
        except (KeyError, TypeError, ValueError) as exc:
            raise self._corrupt(f"tensor {name} has a malformed header entry") from exc
        if not 0 <= begin <= end <= data_size or end - begin != count * dtype.itemsize:
            raise self._corrupt(f"tensor {name} lies outside the file or has the wrong size")

    def keys(self) -> list[str]:
        return list(self._entries)

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32/float16 numpy (bf16 is widened to float32, exactly)."""
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with open(self.path, "rb") as handle:
            got = os.preadv(handle.fileno(), [buffer], self._data_start + begin)
        if got != len(buffer):
            raise self._corrupt(f"tensor {name} is cut short")
        array = np.frombuffer(buffer, dtype=DTYPES[entry["dtype"]]).reshape(entry["shape"])
        if entry["dtype"] == "BF16":
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array
