"""What the planner knows about a device: measured on this machine, or simulated from the table of known GPUs.

Sizes are bytes everywhere; "GB" in user input and in configs/gpus.json means GiB (2^30), the unit nvidia-smi and
GPU vendors' "12 GB" use.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import psutil
import torch

from runtime.errors import InputError, ResourceError

GIB = 1 << 30
GPU_TABLE = Path(__file__).resolve().parent.parent / "configs" / "gpus.json"

# A simulated card is assumed to have this much of its memory held by the driver and a desktop (a display
# server, a browser); measured on a real card, free memory already reflects it. A busier desktop can hold
# more: --vram-budget plans for less.
DESKTOP_RESERVE_BYTES = GIB // 2
# The CUDA context of a fresh process, with the libraries it loads on first use (cuBLAS, the SDPA and our
# Triton kernels), about 0.5 GiB on recent drivers. torch's allocator does not see it, but it takes card memory.
CUDA_CONTEXT_BYTES = GIB // 2
# Measuring free memory creates the context, so a detected card's free memory is net of its base part; the
# libraries loaded later still take about this much.
LIBRARY_LOAD_BYTES = GIB // 4


@dataclass(frozen=True)
class GpuSpec:
    """One row of configs/gpus.json."""

    name: str
    vram_bytes: int  # marketed size
    ecc_bytes: int  # taken by ECC when on by default (T4, L4)
    bandwidth_gbs: float
    compute_capability: tuple[int, int]
    fp8: bool


@dataclass(frozen=True)
class DeviceInfo:
    """The facts the planner needs. For the CPU, `total_bytes` / `free_bytes` describe host RAM."""

    name: str
    kind: str  # "cuda" or "cpu"
    total_bytes: int
    free_bytes: int  # what this process could allocate now
    compute_capability: tuple[int, int] | None
    host_available_bytes: int
    context_bytes: int  # CUDA context memory still to be taken from free_bytes by the process that runs
    simulated: bool = False

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def has_fp8(self) -> bool:
        return self.compute_capability is not None and self.compute_capability >= (8, 9)


def parse_capability(text: str) -> tuple[int, int]:
    """'8.9', '12.0' or 'sm_89' -> (major, minor)."""
    match = re.fullmatch(r"\s*(\d+)\.(\d)\s*|\s*sm_?(\d+)(\d)\s*", text.lower())
    if match is None:
        raise InputError(f"compute capability '{text}' is not like 8.6, 8.9 or 12.0")
    major, minor = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    return int(major), int(minor)


_SIZE_UNITS = {"": GIB, "k": 1 << 10, "m": 1 << 20, "g": GIB, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'8GB', '8 GiB', '7.5G', '8000MB', '8' (GB) -> bytes. Units are binary: GB = GiB = 2^30 bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if match is None or (match.group(2) == "" and text.lower().strip().endswith("b")):
        raise InputError(f"size '{text}' is not like 8GB, 7.5 GiB or 8000MB")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size <= 0:
        raise InputError(f"size '{text}' must be positive")
    return size


def _key(name: str) -> str:
    """Name normalised for matching: case, spaces, dashes and vendor words do not matter."""
    return re.sub(r"[\s\-_]+|nvidia|geforce|tesla", "", name.lower())


@cache
def gpu_table(path: Path = GPU_TABLE) -> tuple[GpuSpec, ...]:
    raw = json.loads(path.read_text(encoding="utf-8"))
    return tuple(
        GpuSpec(
            name=row["name"],
            vram_bytes=int(row["vram_gb"] * GIB),
            ecc_bytes=int(row.get("ecc_gb", 0) * GIB),
            bandwidth_gbs=float(row["bandwidth_gbs"]),
            compute_capability=parse_capability(row["compute_capability"]),
            fp8=bool(row["fp8"]),
        )
        for row in raw["gpus"]
    )


def find_gpu(name: str) -> GpuSpec:
    """A card by name: exact (normalised) match, else the only card whose name contains it; else an error that
    lists the close matches."""
    table = {_key(spec.name): spec for spec in gpu_table()}
    key = _key(name)
    if key in table:
        return table[key]
    containing = [spec for k, spec in table.items() if key and key in k]
    if len(containing) == 1:
        return containing[0]
    if containing:
        raise InputError(f"GPU '{name}' matches several cards: {', '.join(s.name for s in containing)}")
    close = difflib.get_close_matches(key, list(table), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(table[k].name for k in close)}?" if close else ""
    raise InputError(
        f"unknown GPU '{name}'{hint} (known cards are in configs/gpus.json; or give --vram-gb and "
        "--compute-capability)"
    )


def host_available_bytes() -> int:
    return int(psutil.virtual_memory().available)


def simulated_device(
    vram_bytes: int,
    compute_capability: tuple[int, int],
    name: str | None = None,
    host_bytes: int | None = None,
) -> DeviceInfo:
    """A card that is not here: its memory minus what a desktop and driver typically hold is free, and the
    CUDA context is still to be created. Host RAM is this machine's unless given."""
    if vram_bytes <= DESKTOP_RESERVE_BYTES:
        raise InputError(f"a GPU with {vram_bytes / GIB:.2f} GiB of memory is too small to simulate")
    return DeviceInfo(
        name=name or f"a {vram_bytes / GIB:g} GiB GPU",
        kind="cuda",
        total_bytes=vram_bytes,
        free_bytes=vram_bytes - DESKTOP_RESERVE_BYTES,
        compute_capability=compute_capability,
        host_available_bytes=host_available_bytes() if host_bytes is None else host_bytes,
        context_bytes=CUDA_CONTEXT_BYTES,
        simulated=True,
    )


def use_expandable_segments() -> None:
    """Let torch's CUDA allocator grow segments in place instead of caching many fixed-size ones.

    Prefill activations and the per-layer transients of quantize-on-load come in many sizes; in fixed segments
    their freed blocks fragment the cache, and at full context the card held 0.4-0.6 GiB more than was allocated
    (H100, benchmarks/results/plans-*.md), which the planner would have to guess. Takes effect only before the
    first CUDA allocation; a PYTORCH_CUDA_ALLOC_CONF the user set wins.
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def skip_cudnn_attention() -> None:
    """Leave cuDNN out of torch's attention backends: on the H100, where torch prefers it, it builds a plan for
    every new sequence length (46-68 ms each, about 1 s for a process's first on a fresh machine) where flash
    attention takes 0.1 ms, and the prefill, the fast AR's growing context and the codec's pieces each bring new
    lengths. A warm `synthesize` spent 0.35-1.0 s less from "generating" to the audio written without it
    (benchmarks/results/cli-wall-*.md). Flash, memory-efficient and math remain; the attention is the same."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def device_from_spec(spec: GpuSpec, host_bytes: int | None = None) -> DeviceInfo:
    return simulated_device(spec.vram_bytes - spec.ecc_bytes, spec.compute_capability, spec.name, host_bytes)


def detect_device(device: torch.device, host_bytes: int | None = None) -> DeviceInfo:
    """Measure a real device now. On CUDA this creates the CUDA context (so free memory is net of it)."""
    host = host_available_bytes() if host_bytes is None else host_bytes
    if device.type == "cpu":
        total = int(psutil.virtual_memory().total)
        return DeviceInfo("CPU", "cpu", total, host, None, host, context_bytes=0)
    if device.type != "cuda":
        raise ResourceError(f"device '{device}' is not supported: use a CUDA GPU or the CPU")
    if not torch.cuda.is_available():
        raise ResourceError(f"device '{device}' requested but no CUDA GPU is available")
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    return DeviceInfo(
        name=torch.cuda.get_device_name(index),
        kind="cuda",
        total_bytes=int(total),
        free_bytes=int(free),
        compute_capability=tuple(torch.cuda.get_device_capability(index)),
        host_available_bytes=host,
        context_bytes=LIBRARY_LOAD_BYTES,
    )
