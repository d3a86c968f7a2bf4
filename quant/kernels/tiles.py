"""Tile configurations shared by the GEMV kernels, and the autotuner built from them.

A batch-1 GEMV is bound by memory latency more than by arithmetic: it needs every SM busy (132 on an H100) and
enough bytes in flight per SM. In both kernels a thread owns 8 consecutive columns of all BLOCK_N rows of its
program (BLOCK_K / 8 threads per program step, 2 steps in flight), so the bytes in flight over the whole GPU are
about 2 * N * BLOCK_K: a wide BLOCK_K keeps the N = 2 560 shapes (wo, w2 with K = 9 728) busy without a split-K
reduction or a second kernel, a narrow one wastes less of the last step when BLOCK_K does not divide K
(K = 2 560). Which tile wins depends on the shape and the card, hence autotuning keyed on (N, K).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import triton
import triton.language as tl
import triton.testing


@dataclass(frozen=True)
class Tile:
    """One program computes `block_n` output rows, reading `block_k` weight columns per loop step."""

    block_n: int
    block_k: int
    num_warps: int

    def launch_args(self) -> dict[str, int]:
        return {"BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "num_warps": self.num_warps}


# block_k = 256 * num_warps gives each thread one group of 8 columns per row; the last one holds two groups.
TILES: tuple[Tile, ...] = (
    Tile(2, 256, 1),
    Tile(4, 256, 1),
    Tile(8, 256, 1),
    Tile(2, 512, 2),
    Tile(4, 512, 2),
    Tile(8, 512, 2),
    Tile(2, 1024, 4),
    Tile(4, 1024, 4),
    Tile(8, 1024, 4),
    Tile(4, 2048, 8),
    Tile(8, 2048, 8),
    Tile(4, 2048, 4),
)


@triton.jit
def clamp_tail(i, n, EVEN_K: tl.constexpr):
    """Index i, or n - 1 past the end: the last, partial step re-reads the last item (x is 0 there)."""
    if EVEN_K:
        return i
    else:
        return tl.minimum(i, n - 1)


def _quick_bench(fn: Callable[[], Any], quantiles: Any) -> Any:
    """Shorter than Triton's default (25 + 100 ms per tile): a model has about 6 distinct shapes per kernel."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def autotuned(kernel: Any, tiles: tuple[Tile, ...] = TILES) -> Any:
    """Wrap a kernel taking BLOCK_N / BLOCK_K meta-parameters and N, K arguments in an autotuner keyed on N, K."""
    configs = [triton.Config({"BLOCK_N": t.block_n, "BLOCK_K": t.block_k}, num_warps=t.num_warps) for t in tiles]
    return triton.autotune(configs=configs, key=["N", "K"], do_bench=_quick_bench)(kernel)


def chosen_tiles(tuned: Any) -> dict[tuple, str]:
    """The tile the autotuner picked per key (for benchmark reports)."""
    return {key: str(config) for key, config in tuned.cache.items()}
