"""Our Triton kernels for batch-1 decode, where the libraries have no fast path: the quantized GEMVs, and one
launch each where torch takes several small ones: the residual add with the norm and QK-norm + RoPE with the
cache writes (norm_rope.py), SiLU x up (swiglu.py; the GEMVs' gated form computes it with the FFN's gate and up
projections in their launch), a token draw (sample.py), and one decode token's attention over the filled
slots of the K/V cache (decode_attention.py); and, for a multi-token forward, the NF4 weight dequantized without
importing bitsandbytes (dequant_nf4.py).

Triton is optional: CPU installs (CI) have none, and every caller falls back without it (quantized layers to
dequantize + matmul, the model and sampling to their torch expressions). The GEMV kernels choose their
configuration on the first call per (shape, dtype), by timing the candidates; that call synchronizes the device, so
run each quantized layer once (any warm-up step does it) before capturing a CUDA graph. After that a call launches
one kernel on the current stream, allocates only its output and never syncs: it is safe inside graph capture (the
other kernels always are).
"""

from __future__ import annotations

import functools
import importlib.util
import statistics
import threading
from pathlib import Path

import torch

# Multiply-adds contracted to FMA, as every kernel here was timed and checked: Triton 3.10 stops contracting by
# default (3.9 warns about it at each compile), which moves the roundings and adds an instruction per product
# (the INT8 GEMV at K = 2 560 for sm_90: 824 -> 984 instructions per program, benchmarks/sass_count.py).
FMA = {"enable_fp_fusion": True}  # launch options, passed at every launch


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def kernels_supported(device: torch.device) -> bool:
    """Our kernels (all of this package) need Triton and an Ampere or newer GPU (bf16 loads, sm_80+)."""
    return device.type == "cuda" and triton_available() and _capability(_index(device)) >= (8, 0)


def compile_cache_empty() -> bool:
    """Whether Triton's kernel cache (TRITON_CACHE_DIR, ~/.triton/cache by default) holds nothing yet: then the first
    decode step compiles every kernel it uses, about 22 s for the NF4 plans on an H100 host
    (benchmarks/results/kernel-choice-*.md), once per machine."""
    if not triton_available():
        return False
    import triton.knobs

    path = Path(triton.knobs.cache.dir)
    return not path.is_dir() or next(path.iterdir(), None) is None


def hash_triton_in_background() -> None:
    """Start hashing Triton's installation on a thread of its own. A process's first kernel launch keys the
    compiled-kernel cache by a digest of Triton's files, libtriton's 500 MB included: 0.46 s on an H100 host
    (benchmarks/results/cli-wall-*.md). Triton keeps the digest once made; hashing releases the GIL, so started
    before the model loads it is ready by the first launch. A Triton without that function is left alone."""
    def digest() -> None:
        try:
            from triton.runtime.cache import triton_key

            triton_key()
        except (ImportError, OSError):  # the first launch meets (and reports) an unreadable installation itself
            return

    threading.Thread(target=digest, name="s2edge-triton-key", daemon=True).start()


def fp8_native(device: torch.device) -> bool:
    """Whether Triton can convert float8_e4m3fn natively (sm_89+); older cards decode the bits instead."""
    return _capability(_index(device)) >= (8, 9)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int, warmup: int) -> float:
    """Median milliseconds per replay of a captured CUDA graph, CUDA events around each (after `warmup` untimed)."""
    for _ in range(warmup):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)
