"""Read and write safetensors files one tensor at a time, so that a merge holds one tensor in memory, not a shard.

`safetensors.torch.save_file` builds the whole file in memory (every tensor turned into bytes first), and
`safe_open` maps the input, so every page it touches stays resident until the file is closed. For a 70B merge on a
workstation both matter. The format is simple enough to stream: 8 bytes (little-endian header length), a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the tensors' bytes, back to
back in offset order. Files written here load with `safetensors` and `transformers` like any other.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
HEADER_ALIGNMENT = 8  # the reference writer pads the header with spaces so the data starts 8-byte aligned
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference reader's limit: a larger "header" means a corrupt file


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offsets of its bytes
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | Path) -> tuple[list[TensorEntry], dict[str, str]]:
    r"""
    The tensors of a safetensors file (in file order) and its `__metadata__`, without reading any tensor.

    Raises:
        `ValueError`: If the file is not a readable safetensors file (truncated, corrupt, an unknown dtype).
    """
    path = Path(path)
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length).")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path} is not a safetensors file (header length {length}); it may be corrupt.")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} has an unreadable safetensors header ({error}); it may be corrupt.") from None
    data_start = 8 + length
    metadata = header.pop("__metadata__", None) or {}
    entries = []
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which this merge cannot read.")
        begin, end = info["data_offsets"]
        entries.append(
            TensorEntry(name, DTYPES[info["dtype"]], tuple(info["shape"]), data_start + begin, data_start + end)
        )
    entries.sort(key=lambda entry: entry.begin)
    size = path.stat().st_size
    if entries and entries[-1].end > size:
        raise ValueError(f"{path} is truncated ({size} bytes, its header needs {entries[-1].end}); download it again.")
    return entries, metadata


def read_tensor(handle: BinaryIO, entry: TensorEntry) -> torch.Tensor:
    """Read one tensor into fresh memory with `readinto` (no memory map, so nothing stays resident after it)."""
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    handle.seek(entry.begin)
    view = memoryview(buffer.numpy())
    got = 0
    while got < entry.nbytes:
        count = handle.readinto(view[got:])
        if not count:
            raise ValueError(f"{handle.name} ended inside tensor {entry.name!r}; the file is truncated.")
        got += count
    return buffer.view(entry.dtype).reshape(entry.shape)


def iter_tensors(path: str | Path, entries: Iterable[TensorEntry] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for each tensor of a safetensors file, one at a time, in file order."""
    entries = read_header(path)[0] if entries is None else entries
    with Path(path).open("rb") as handle:
        for entry in entries:
            yield entry.name, read_tensor(handle, entry)


def tensor_nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    """Bytes of a tensor of this shape and dtype."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class ShardWriter:
    r"""
    Write one safetensors file whose tensors are known in advance (names, shapes, dtypes) and arrive one at a time.

    The header is written first; each `write(name, tensor)` then appends that tensor's bytes, in the announced
    order. `close()` checks that every announced tensor came.

    Args:
        path (`str` or `Path`): The file to write.
        layout (`list[tuple[str, tuple[int, ...], torch.dtype]]`): The tensors, in the order they will be written.
        metadata (`dict[str, str]`, *optional*): The file's `__metadata__`; transformers expects `{"format": "pt"}`.
    """

    def __init__(
        self,
        path: str | Path,
        layout: list[tuple[str, tuple[int, ...], torch.dtype]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, shape, dtype in layout:
            size = tensor_nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
        self.path = Path(path)
        self._expected = [(name, tuple(shape), dtype) for name, shape, dtype in layout]
        self._next = 0
        self._handle = self.path.open("wb")
        self._handle.write(struct.pack("<Q", len(encoded)))
        self._handle.write(encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, shape, dtype = self._expected[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (expected_name, shape, dtype):
            raise ValueError(
                f"{self.path}: expected {expected_name} {shape} {dtype} next, got {name} {tuple(tensor.shape)} "
                f"{tensor.dtype}."
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._handle.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        self._handle.close()
        if self._next != len(self._expected):
            missing = [name for name, _, _ in self._expected[self._next :]]
            raise ValueError(f"{self.path} was closed before its tensors {missing[:3]} were written.")

    def abort(self) -> None:
        """Close without the completeness check (the caller is cleaning up after an error)."""
        self._handle.close()


__all__ = ["DTYPES", "ShardWriter", "TensorEntry", "iter_tensors", "read_header", "read_tensor", "tensor_nbytes"]
