"""Read and write safetensors files one tensor at a time, so that a merge holds one tensor in memory, not a shard.

`safetensors.torch.save_file` builds the whole file in memory (every tensor turned into bytes first), and
`safe_open` maps the input, so every page it touches stays resident until the file is closed. For a 70B merge on a
workstation both matter. The format is simple enough to stream: 8 bytes (little-endian header length), a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the tensors' bytes, back to
back in offset order. Files written here load with `safetensors` and `transformers` like any other.

Which tensor goes in which file is not decided here: [`plan_shards`] asks `huggingface_hub` (the planner behind
`save_pretrained` and `save_torch_state_dict`) with meta tensors standing in for the weights, so the file names, the
grouping and the index are the ecosystem's while no weight has to be in memory to plan them.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import torch

if TYPE_CHECKING:
    from huggingface_hub import StateDictSplit

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
# huggingface_hub's default (`split_torch_state_dict_into_shards`, `save_torch_state_dict`): files the Hub's browser,
# git-lfs and resumable downloads handle well
DEFAULT_MAX_SHARD_SIZE = "5GB"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# decimal units as huggingface_hub reads `max_shard_size`, binary ones as transformers does; case does not matter
SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


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


def parse_size(size: int | str) -> int:
    r"""
    A shard size in bytes, from a number of bytes or a string such as `"5GB"`, `"500MB"`, `"1.5GB"` or `"2GiB"`.

    huggingface_hub and transformers read `max_shard_size` this way (KB, MB, GB, TB are powers of 10; KiB, MiB, GiB,
    TiB powers of 2), but neither exports its parser, so this is a copy of their rules that also takes plain byte
    counts written as text (`"1000"`), as a command line gives them.

    Raises:
        `ValueError`: If `size` is not a size, or is under one byte.
    """
    hint = "write e.g. 5GB, 500MB, 2GiB or a number of bytes"
    if isinstance(size, bool) or not isinstance(size, int | str):
        raise ValueError(f"{size!r} is not a size; {hint}.")
    if isinstance(size, int):
        count = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", size)
        unit = (match.group(2) or "B").upper() if match else ""
        if unit not in SIZE_UNITS:
            raise ValueError(f"{size!r} is not a size; {hint}.")
        count = int(Decimal(match.group(1)) * SIZE_UNITS[unit])  # exact: "1.1GB" is 1100000000 bytes
    if count < 1:
        raise ValueError(f"{size!r} is not a size of at least one byte; {hint}.")
    return count


def plan_shards(
    layout: Iterable[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> StateDictSplit:
    r"""
    The files a checkpoint with these tensors is saved in, planned by `huggingface_hub` as `save_pretrained` plans
    them: `model.safetensors` when one file holds everything, else `model-00001-of-0000N.safetensors`, each at most
    `max_shard_size` bytes (a larger tensor gets a file of its own), filled in `layout` order.

    Only shapes and dtypes are needed, so meta tensors stand in for the weights: planning a 70B checkpoint takes no
    memory.

    Args:
        layout (`Iterable[tuple[str, tuple[int, ...], torch.dtype]]`): Name, shape and dtype of every tensor, in the
            order they should fill the files.
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`): Bytes, or a size such as `"500MB"` (see
            [`parse_size`]).

    Returns:
        `huggingface_hub.StateDictSplit`: `filename_to_tensors` (the files, in order, and their tensors),
        `tensor_to_filename` and `metadata` (`total_size`), which together are the index (see [`write_index`]).

    Raises:
        `ValueError`: If `max_shard_size` is not a size.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    stand_ins = {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape, dtype in layout}
    return split_torch_state_dict_into_shards(stand_ins, max_shard_size=parse_size(max_shard_size))


def write_index(folder: str | Path, split: StateDictSplit) -> Path | None:
    """Write `model.safetensors.index.json` for a sharded `split`, as `save_pretrained` does (`metadata.total_size`
    and the sorted `weight_map`); a single-file checkpoint has no index, and `None` is returned."""
    if not split.is_sharded:
        return None
    path = Path(folder) / SAFETENSORS_INDEX
    index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


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


__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "DTYPES",
    "SAFETENSORS_INDEX",
    "ShardWriter",
    "TensorEntry",
    "iter_tensors",
    "parse_size",
    "plan_shards",
    "read_header",
    "read_tensor",
    "tensor_nbytes",
    "write_index",
]
