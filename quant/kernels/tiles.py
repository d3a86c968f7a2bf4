"""Tile configurations shared by the GEMV kernels, the autotuner built from them, and how they are timed.

A batch-1 GEMV on these shapes (8-50 MB of weights, a few microseconds per call) is bound by instruction issue
and memory latency, not by DRAM bandwidth. Both kernels take K as a compile-time constant and unroll the whole K
loop, so the compiler can issue a row's loads before its arithmetic: on an H100 that alone made them 15-25 %
faster than a software-pipelined loop over a runtime K (benchmarks/results/gemv-*.md). The winning programs
are small, one warp over 1-2 rows, many of them; which one wins depends on N and K, hence autotuning keyed on both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import triton
import triton.language as tl
import triton.testing


@dataclass(frozen=True)
class Tile:
    """One program computes `block_n` output rows, reading `block_k` weight columns per (unrolled) step."""

    block_n: int
    block_k: int
    num_warps: int

    def launch_args(self) -> dict[str, int]:
        return {"BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "num_warps": self.num_warps}


# The tiles that won some S2 shape for some format in a wider sweep on an H100 (1-8 rows, 128-2048 columns, 1-8
# warps); a short list keeps the first-call autotuning (and its compilation per K) quick.
TILES: tuple[Tile, ...] = (
    Tile(1, 256, 1),
    Tile(2, 256, 1),
    Tile(1, 512, 1),
    Tile(2, 512, 1),
    Tile(2, 512, 2),
    Tile(4, 1024, 4),
)


@triton.jit
def step_columns(k0, offsets, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns of the step starting at k0, clamped to K - 1 in the last, partial step (x is 0 there)."""
    if k0 + BLOCK_K <= K:
        return k0 + offsets
    else:
        return tl.minimum(k0 + offsets, K - 1)


def graph_bench(fn: Callable[[], Any], quantiles: Any = None) -> Any:
    """Time a kernel configuration as decode runs it: replayed in a CUDA graph, no launch overhead per call.

    Eager timing (Triton's default) adds microseconds of launch latency to kernels that run for 5-10 us and
    picked tiles up to 10 % slower in the graph (H100). 20 ms per tile keeps the first call quick.
    """
    return triton.testing.do_bench_cudagraph(fn, rep=20, quantiles=quantiles)


def cold_copy_count(nbytes: int, l2_bytes: int, limit: int = 32) -> int:
    """How many copies of `nbytes` of weights fill L2 twice over (at least 1, at most `limit`)."""
    return max(1, min(limit, -(-2 * l2_bytes // max(nbytes, 1))))


def cold_copies(tensors: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    """The tensors and copies of them to cycle through while timing, so each call reads its weight from DRAM.

    Decode reads every weight once per step, from DRAM; a weight that stays in L2 times the arithmetic but not the
    memory traffic that the NF4 plans differ in (H100, 9728x2560: 16 programs/SM 6.8 us hot, 8.2 us cold; 20/SM
    7.2 us hot, 7.6 us cold). Costs 2 x L2 of memory for the moment of timing (100 MB on an H100, 144 MB on an
    RTX 4090: inside the planner's margin of at least 0.5 GiB), and never more than a quarter of the free memory:
    short of it, fewer copies.
    """
    nbytes = sum(t.nbytes for t in tensors)
    device = tensors[0].device
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    affordable = torch.cuda.mem_get_info(device)[0] // 4 // max(nbytes, 1)
    sets = [tensors]
    try:
        for _ in range(min(cold_copy_count(nbytes, l2), affordable + 1) - 1):
            sets.append(tuple(t.clone() for t in tensors))
    except torch.cuda.OutOfMemoryError:
        pass
    return sets


def autotuned(kernel: Any, configs: Sequence[Tile | tuple[Tile, dict[str, Any]]] = TILES,
              key: Sequence[str] = ("N", "K")) -> Any:
    """Wrap a kernel taking BLOCK_N / BLOCK_K meta-parameters in an autotuner keyed on `key` (its N, K arguments
    and any other argument that changes the best tile).

    A config is a tile, or a tile with more meta-parameters of the kernel (a choice of algorithm, say).
    """
    pairs = [c if isinstance(c, tuple) else (c, {}) for c in configs]
    triton_configs = [triton.Config({"BLOCK_N": t.block_n, "BLOCK_K": t.block_k, **extra}, num_warps=t.num_warps)
                      for t, extra in pairs]
    return triton.autotune(configs=triton_configs, key=list(key), do_bench=graph_bench)(kernel)


def chosen_tiles(tuned: Any) -> dict[tuple, str]:
    """The tile the autotuner picked per key (for benchmark reports)."""
    return {key: str(config) for key, config in tuned.cache.items()}
