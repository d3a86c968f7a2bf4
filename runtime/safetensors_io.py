"""Reading and writing safetensors files one tensor at a time.

Headers are parsed here (8-byte little-endian length + JSON) rather than through `safetensors.safe_open` so
that (a) a truncated file is named before anything is loaded, (b) each tensor is read with one positioned
`readinto` into a buffer of its own size (or, bound for a GPU, through two pinned 32 MiB buffers): no mmap, so the
process never maps a 5 GB shard and resident memory stays near one tensor above what the caller keeps, and (c) a
writer can stream tensors it produces one by one. The files are standard safetensors: the library reads what we
write and we read what it writes.
"""

from __future__ import annotations

import functools
import json
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from runtime.errors import CheckpointError
from runtime.files import atomic_path

_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, absolute byte range, dtype and shape (from the shard header)."""

    file: Path
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse a safetensors header and check the file is long enough for every tensor it lists."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path.name}: truncated or not a safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, 100 * 2**20):
                raise CheckpointError(f"{path.name}: corrupt safetensors header (length {header_len})")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not JSON)") from None
    base = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, TensorEntry] = {}
    data_end = 0
    for key, info in header.items():
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path.name}: tensor '{key}' has unsupported dtype {info.get('dtype')}")
        start, end = info["data_offsets"]
        entries[key] = TensorEntry(path, base + start, base + end, dtype, tuple(info["shape"]))
        data_end = max(data_end, base + end)
    if size < data_end:
        raise CheckpointError(f"{path.name}: truncated shard ({size:,} bytes on disk, header needs {data_end:,})")
    return entries, metadata


def read_tensor(entry: TensorEntry, staging: CudaStaging | None = None) -> torch.Tensor:
    """Read one tensor from disk into a fresh CPU tensor (one buffer, no mmap), or with `staging` straight into a
    tensor on its GPU."""
    if staging is not None:
        return staging.read(entry)
    data = torch.empty(entry.nbytes, dtype=torch.uint8)
    got = _read_chunk(entry.file, entry.start, memoryview(data.numpy()))
    if got != entry.nbytes:
        raise CheckpointError(f"{entry.file.name}: short read ({got} of {entry.nbytes} bytes)")
    return data.view(entry.dtype).reshape(entry.shape)


def cuda_staging(device: torch.device) -> CudaStaging | None:
    """Staging for reads bound for `device`, or None (read through pageable memory) where it is no GPU or the pinned
    buffers cannot be had: some hosts cap page-locked memory (WSL among them), and loading must not fail for it."""
    if device.type != "cuda":
        return None
    try:
        return CudaStaging(device)
    except RuntimeError:
        return None


def _read_into(f, view) -> int:
    """readinto until `view` is full or the file ends (a raw read may return less than asked)."""
    done = 0
    while done < len(view) and (got := f.readinto(view[done:])):
        done += got
    return done


@functools.cache
def _readers() -> ThreadPoolExecutor:
    """The threads that read staged chunks, shared by every staging of the process (idle between loads)."""
    return ThreadPoolExecutor(max_workers=CudaStaging.READERS, thread_name_prefix="s2edge-read")


def _read_chunk(file: Path, offset: int, view: memoryview) -> int:
    with open(file, "rb", buffering=0) as f:
        f.seek(offset)
        return _read_into(f, view)


class CudaStaging:
    """Tensors read from disk into GPU memory through pinned host buffers: READERS threads each read a CHUNK of the
    file into a buffer of its own while the chunks read before are copied to the GPU. A pageable tensor's
    `.to("cuda")` copies synchronously through the driver's own staging, after the whole read: the bf16 checkpoint
    loaded at 1.0-1.3 GB/s from the page cache that way, and at 6.7 GB/s through two buffers in turns with one
    reader (H100; benchmarks/results/load-bf16-*.md). From the page cache one thread reads 5.4-6.8 GB/s, four 17-23
    and eight 24-32 (into pinned memory and on to an H200, 4 MiB chunks fastest; bf16 loads 2.3-2.6 -> 1.0-1.1 s:
    benchmarks/results/load-staging-*.md). Holds 2 x READERS x CHUNK (64 MiB) of pinned host memory while it
    lives."""

    CHUNK = 4 * 2**20
    READERS = 8

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers = [torch.empty(self.CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2 * self.READERS)]
        self.copied: list[torch.cuda.Event | None] = [None] * len(self.buffers)  # each buffer's last copy done
        self.turn = 0

    def read(self, entry: TensorEntry) -> torch.Tensor:
        return next(self.read_all([entry]))

    def read_all(self, entries: Iterable[TensorEntry]) -> Iterator[torch.Tensor]:
        """Each entry's tensor in GPU memory, in order, with up to READERS chunks in flight across tensors: the
        reads of the next tensors run while this one's chunks are copied. The pre-quantized NF4 store is 1 258
        tensors, most of them a few kilobytes or less: read one at a time, each waiting for its own read, it loaded
        in 0.85-1.18 s; this way in 0.62-1.06 s (H100, benchmarks/results/load-store-*.md)."""
        reading: deque[_Chunk] = deque()
        try:
            for chunk in self._chunks(entries):
                if chunk.size:
                    index, self.turn = self.turn, (self.turn + 1) % len(self.buffers)
                    if self.copied[index] is not None:
                        self.copied[index].synchronize()
                    view = memoryview(self.buffers[index].numpy())[:chunk.size]
                    chunk.buffer = index
                    chunk.read = _readers().submit(_read_chunk, chunk.entry.file, chunk.entry.start + chunk.start,
                                                   view)
                reading.append(chunk)
                while len(reading) >= self.READERS or (reading and reading[0].read is None):
                    yield from self._copy(reading.popleft())
            while reading:
                yield from self._copy(reading.popleft())
        finally:
            for chunk in reading:  # after an error, or a caller that stopped early: no read may still fill a buffer
                if chunk.read is not None:
                    chunk.read.exception()

    def _chunks(self, entries: Iterable[TensorEntry]) -> Iterator[_Chunk]:
        """The chunks of each entry into a GPU tensor of its own (an empty tensor: one chunk of no bytes)."""
        for entry in entries:
            out = torch.empty(entry.nbytes, dtype=torch.uint8, device=self.device)
            starts = range(0, entry.nbytes, self.CHUNK) or [0]
            for start in starts:
                yield _Chunk(entry, out, start, min(self.CHUNK, entry.nbytes - start),
                             last=start + self.CHUNK >= entry.nbytes)

    def _copy(self, chunk: _Chunk) -> Iterator[torch.Tensor]:
        """Copy a chunk whose read is done to its place; after a tensor's last chunk, the tensor."""
        if chunk.read is not None:
            got = chunk.read.result()
            if got != chunk.size:
                raise CheckpointError(f"{chunk.entry.file.name}: short read ({chunk.start + got} of "
                                      f"{chunk.entry.nbytes} bytes)")
            chunk.out[chunk.start:chunk.start + chunk.size].copy_(self.buffers[chunk.buffer][:chunk.size],
                                                                   non_blocking=True)
            self.copied[chunk.buffer] = torch.cuda.Event()
            self.copied[chunk.buffer].record()
        if chunk.last:
            yield chunk.out.view(chunk.entry.dtype).reshape(chunk.entry.shape)


@dataclass
class _Chunk:
    """A part of one tensor on its way: [start, start + size) of `entry` into `out`, read into staging buffer
    `buffer` by `read` (None for a tensor of no bytes)."""

    entry: TensorEntry
    out: torch.Tensor
    start: int
    size: int
    last: bool
    buffer: int = -1
    read: Future[int] | None = None


def write_safetensors(
    path: Path,
    specs: list[tuple[str, tuple[int, ...], torch.dtype]],
    make: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write tensors named in `specs` (key, shape, dtype), each produced by `make(key)` only when its turn comes.

    Returns the file size. The file appears atomically: a crash leaves nothing behind.
    """
    header: dict[str, object] = {}
    offset = 0
    for key, shape, dtype in specs:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as the library does
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for key, shape, dtype in specs:
                tensor = make(key)
                if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                    raise ValueError(f"{key}: produced {tuple(tensor.shape)} {tensor.dtype}, declared {shape} {dtype}")
                f.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    return 8 + len(blob) + offset
