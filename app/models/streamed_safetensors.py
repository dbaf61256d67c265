"""Reading and writing a `.safetensors` file one tensor at a time, so a merged checkpoint never sits in memory whole.

`safetensors.torch.save_file` takes a dict of every tensor; merging two SDXL checkpoints that way holds about 14 GB
of merged fp32 tensors besides its inputs. The format is simple enough to write as the tensors are made: an 8-byte
little-endian header length, a JSON header giving each tensor's dtype, shape and byte range (and `__metadata__`),
padded with spaces to a multiple of 8, then the tensors' bytes in that order. Every shape and dtype must be known
before the first byte is written, which a merge knows from its inputs' headers. Read back by the safetensors
library itself in the tests.

Reading (`StreamedReader`) takes each tensor's bytes with one positioned read instead of the library's memory map:
a mapped file's pages count in the process's memory for as long as it is open (merging two SD1.5 files that way
peaked at 4.2 GB above the start, all of it the two inputs), while a read tensor is freed when it is used."""

from __future__ import annotations

import json
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from app.fileio import atomic_write

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor of the file to be: its name, dtype and shape, known before it is computed."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def header(entries: list[Entry], metadata: dict[str, str] | None) -> bytes:
    """The length prefix and JSON header for `entries`, stored in their order."""
    table: dict[str, object] = {}
    if metadata:
        table["__metadata__"] = dict(metadata)
    offset = 0
    for entry in entries:
        if entry.dtype not in DTYPES:
            raise ValueError(f"{entry.name}: safetensors has no dtype {entry.dtype}")
        table[entry.name] = {
            "dtype": DTYPES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    text = json.dumps(table, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it
    return struct.pack("<Q", len(text)) + text


def write_streamed(
    dst: Path,
    entries: Iterable[Entry],
    produce: Callable[[Entry], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `dst` atomically, calling `produce(entry)` for each tensor in turn (it may raise to stop: no file is
    left); each produced tensor must have its entry's dtype and shape."""
    entries = list(entries)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("two tensors with the same name")

    def write(tmp: Path) -> None:
        # one thread writes while this one makes the next tensor (both release the GIL): the disk and the
        # arithmetic overlap; at most two tensors wait, and a failed write stops the loop at the next tensor
        with open(tmp, "wb") as f, ThreadPoolExecutor(max_workers=1) as writer:
            f.write(header(entries, metadata))
            pending: deque[Future] = deque()
            for entry in entries:
                tensor = produce(entry)
                if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
                    raise ValueError(
                        f"{entry.name}: made {tensor.dtype} {tuple(tensor.shape)}, declared {entry.dtype} {entry.shape}"
                    )
                # little-endian bytes, as the format stores them (every platform torch runs on here is)
                data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                pending.append(writer.submit(f.write, data))
                while len(pending) > 1:
                    pending.popleft().result()
            while pending:
                pending.popleft().result()

    atomic_write(dst, write)


class StreamedReader:
    """A `.safetensors` file's header, and its tensors read one at a time (`get`), each a fresh CPU tensor. A file
    whose header is not the format's (too long, not JSON, offsets outside the file or not matching the shapes)
    raises ValueError before any tensor is read."""

    MAX_HEADER = 100 * 2**20  # the library's own limit

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None  # opened at the first read, kept for the others
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError("the file is shorter than a safetensors header")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(self.MAX_HEADER, size - 8):
                raise ValueError(f"its header claims {length} bytes, more than the file holds")
            try:
                table = json.loads(f.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"its header is not JSON ({e})") from None
        if not isinstance(table, dict):
            raise ValueError("its header is not a JSON object")
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in (table.pop("__metadata__", None) or {}).items()}
        self.entries: dict[str, tuple[Entry, int]] = {}
        data_size = size - 8 - length
        for name, info in table.items():
            try:
                dtype = TORCH_DTYPES[info["dtype"]]
                shape = tuple(int(n) for n in info["shape"])
                start, end = (int(n) for n in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(
                    f"its header entry for {name!r} is not a tensor's (dtype, shape, data_offsets)"
                ) from None
            entry = Entry(name, dtype, shape)
            if min(shape, default=0) < 0 or not 0 <= start <= end <= data_size or end - start != entry.nbytes:
                raise ValueError(f"its tensor {name!r} lies outside the file or does not match its shape")
            self.entries[name] = (entry, 8 + length + start)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def get(self, name: str) -> torch.Tensor:
        entry, offset = self.entries[name]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        data = torch.empty(entry.nbytes, dtype=torch.uint8)  # not zero-filled: the read overwrites every byte
        view, done = memoryview(data.numpy()), 0
        while done < entry.nbytes:  # a positioned read may return less than asked
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise ValueError(f"the file ended inside tensor {name!r}; it may be truncated")
            done += got
        return data.view(entry.dtype).reshape(entry.shape)
