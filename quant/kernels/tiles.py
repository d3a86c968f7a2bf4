"""Tile configurations shared by the GEMV kernels, and the autotuner built from them.

A batch-1 GEMV is bound by memory latency, not arithmetic: what matters is enough programs to cover every SM
(132 on an H100) and enough bytes in flight per SM. Narrow row blocks give many programs even where the output
has only 2 560 rows and K is long (w2: 2560 x 9728), so no split-K reduction (and no second kernel) is needed.
Which tile wins depends on the shape and the card, hence autotuning keyed on (N, K).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import triton
import triton.testing


@dataclass(frozen=True)
class Tile:
    """One program computes `block_n` output rows, reading `block_k` weight columns per loop step."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 1

    def launch_args(self) -> dict[str, int]:
        return {"BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "num_warps": self.num_warps,
                "num_stages": self.num_stages}


# Candidate tiles, from one row per program with long K steps to 16 rows with short ones.
TILES: tuple[Tile, ...] = (
    Tile(1, 2048),
    Tile(2, 1024),
    Tile(2, 2048, num_warps=8),
    Tile(4, 512),
    Tile(4, 1024),
    Tile(4, 1024, num_stages=3),
    Tile(4, 2048, num_warps=8),
    Tile(8, 512),
    Tile(8, 1024, num_warps=8),
    Tile(16, 256),
    Tile(16, 512, num_warps=8),
)


def _quick_bench(fn: Callable[[], Any], quantiles: Any) -> Any:
    """Shorter than Triton's default (25 + 100 ms per tile): a model has about 6 distinct shapes per kernel."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def autotuned(kernel: Any, tiles: tuple[Tile, ...] = TILES) -> Any:
    """Wrap a kernel taking BLOCK_N / BLOCK_K meta-parameters and N, K arguments in an autotuner keyed on N, K."""
    configs = [
        triton.Config({"BLOCK_N": t.block_n, "BLOCK_K": t.block_k}, num_warps=t.num_warps, num_stages=t.num_stages)
        for t in tiles
    ]
    return triton.autotune(configs=configs, key=["N", "K"], do_bench=_quick_bench)(kernel)


def chosen_tiles(tuned: Any) -> dict[tuple, str]:
    """The tile the autotuner picked per key (for benchmark reports)."""
    return {key: str(config) for key, config in tuned.cache.items()}
