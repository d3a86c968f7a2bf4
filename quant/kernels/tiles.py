"""Tile configurations shared by the GEMV kernels, and how the first call per shape chooses among candidates.

A batch-1 GEMV on these shapes (8-50 MB of weights, a few microseconds per call) is bound by instruction issue
and memory latency, not by DRAM bandwidth. Both kernels take K as a compile-time constant and unroll the whole K
loop, so the compiler can issue a row's loads before its arithmetic: on an H100 that alone made them 15-25 %
faster than a software-pipelined loop over a runtime K (benchmarks/results/gemv-*.md). The winning programs
are small, one warp over 1-2 rows, many of them; which one wins depends on N and K, so the first call per shape
times the candidates (`fastest`) the way decode runs them: in a CUDA graph, each weight read from DRAM.
"""

from __future__ import annotations

import functools
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime.errors import OutOfResources, PTXASError

from quant.kernels import FMA, choices, replay_ms


@dataclass(frozen=True)
class Tile:
    """One program computes `block_n` output rows, reading `block_k` weight columns per (unrolled) step."""

    block_n: int
    block_k: int
    num_warps: int

    def launch_args(self) -> dict[str, int]:
        return {"BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "num_warps": self.num_warps} | FMA


# The tiles that won some S2 shape for some format in a wider sweep on an H100 (1-8 rows, 128-2048 columns, 1-8
# warps); a short list keeps the first call's timing (and its compilation per K) quick.
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


def graph_bench(fn: Callable[[], Any], replays: int = 20, warmup: int = 3) -> float:
    """Time a kernel configuration as decode runs it: `fn` (its calls over the cold copies) captured once in a CUDA
    graph, the median replay in ms. No launch latency per call: timed eagerly, Triton's default, tiles of kernels
    that run 5-10 us came out up to 10 % slower in the graph (H100). One capture and a few short replays keep the
    first call quick (0.05-0.24 s per S2 shape on an H100 once compiled; benchmarks/results/kernel-choice-*.md)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return replay_ms(graph, replays, warmup)


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


Candidate = TypeVar("Candidate")
CANNOT_RUN = (OutOfResources, CompileTimeAssertionFailure, PTXASError)  # this GPU lacks what the configuration needs


def first_calls(tensors: tuple[torch.Tensor, ...], candidates: Sequence[Candidate],
                run: Callable[..., Any]) -> list[Candidate]:
    """Run every candidate once and return those that ran, in their order.

    A candidate's first call compiles it (Triton's front end, LLVM, ptxas): the whole cost of a first run on a
    machine whose Triton cache is empty. Compiling runs in parallel across threads, so all but the first candidate
    run in threads of their own, on the caller's device and stream, once the work queued there is done: a shape's
    candidates cost about the slowest one instead of their sum. The first (the default) runs alone before them: it
    may make first-call choices of its own (the gated forms' default launches the plain GEMVs), whose CUDA graph
    captures must not meet other threads' launches. One this GPU cannot compile or launch (CANNOT_RUN) is left
    out; when none can run, its error is raised.
    """
    device = tensors[0].device
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def error_of(candidate: Candidate) -> BaseException | None:
        with ExitStack() as context:
            if stream is not None:
                context.enter_context(torch.cuda.device(device))
                context.enter_context(torch.cuda.stream(stream))
            try:
                run(candidate, *tensors)
            except CANNOT_RUN as error:
                return error
        return None

    errors = [error_of(candidates[0])]
    if stream is not None:
        stream.synchronize()
    with ThreadPoolExecutor(max_workers=max(2, min(len(candidates), os.cpu_count() or 1))) as pool:
        errors += pool.map(error_of, candidates[1:])
    runnable = [candidate for candidate, error in zip(candidates, errors) if error is None]
    if not runnable:
        raise errors[0]
    return runnable


def kept_index(device: torch.device, key: tuple, candidates: Sequence) -> int | None:
    """The index of an earlier process's choice for `key` among `candidates`, where choices.remember_in gave a file."""
    memory = choices.current()
    return None if memory is None else memory.recall(device, key, candidates)


def stand_in_rows(n: int) -> int:
    """Rows of a stand-in weight on which the kernels compile what they compile for `n` rows: Triton specializes an
    integer argument only on its width, on being 1 and on divisibility by 16, and the GEMVs take N as such an
    argument (K, the tile and the flags are compile-time constants). 16 + n % 16 rows (n itself where fewer)."""
    return min(n, 16 + n % 16)


def ahead(key: tuple, tensors: tuple[torch.Tensor, ...], candidates: Sequence[Candidate],
          run: Callable[..., Any]) -> list[Callable[[], Any]]:
    """One call per candidate that `fastest(tensors, candidates, run, key)` would compile for its first call: each
    runs its candidate once on `tensors`, stand-ins shaped like the weights (stand_in_rows), compiling it. No call
    for a None candidate (the library's path: cuBLAS, or a gated form's separate launches), nothing of ours to
    compile; and none at all where an earlier process's choice is kept: the first call then runs that one alone,
    which loads it from Triton's cache as quickly as a thread would."""
    if kept_index(tensors[0].device, key, candidates) is not None:
        return []
    return [functools.partial(run, candidate, *tensors) for candidate in candidates if candidate is not None]


NEAR = 0.05  # candidates within this fraction of the quickest are timed again
ROUNDS = 3  # timings of each such candidate, interleaved; the median decides
CALLS = 36  # calls per timed replay at least (one per slow-AR layer): the graph's own launch stays a small part


def fastest(tensors: tuple[torch.Tensor, ...], candidates: Sequence[Candidate], run: Callable[..., Any],
            key: tuple) -> Candidate:
    """The candidate c whose `run(c, *tensors)` is quickest, each replayed in a CUDA graph over copies of the tensors
    that do not fit in L2 together (cold_copies); the first of equal times wins, so list a default first. `key`
    names the call (kernel, shape, dtypes): where choices.remember_in gave a file, the choice of an earlier process
    for the same key, candidates and machine is taken without timing, and a new one is kept there.

    Every candidate runs once before any timing (first_calls, which compiles them in parallel): compiling (and any
    choice of its own) stays out of the timing and out of the graph capture; one this GPU cannot compile or launch
    (registers, shared memory) is left out, as Triton's autotuner does. Timed hot, in L2, Triton's autotuner picked
    8-bit tiles 5-12 % slower in decode on an H100 (FP8 2560x4096 0.223 vs 0.200 ms per 36 cold calls). One timing
    each was not enough either: NF4 2560x4096's two best plans, 3 % apart, swapped in one of five processes; so the
    near ones are timed again, in turns, and their medians compared (benchmarks/results/kernel-choice-*.md).
    """
    device, listed = tensors[0].device, candidates
    if (known := kept_index(device, key, listed)) is not None:
        return listed[known]
    candidates = first_calls(tensors, candidates, run)
    sets = cold_copies(tensors)
    calls = [sets[j % len(sets)] for j in range(max(CALLS, len(sets)))]  # the copies in turn

    def timed(i: int) -> float:
        return graph_bench(lambda: [run(candidates[i], *t) for t in calls])

    times = [[timed(i)] for i in range(len(candidates))]
    best = min(t[0] for t in times)
    near = [i for i, t in enumerate(times) if t[0] <= best * (1 + NEAR)]
    if len(near) > 1:
        for _ in range(ROUNDS - 1):
            for i in near:
                times[i].append(timed(i))
    medians = {i: statistics.median(times[i]) for i in near}
    choice = candidates[min(near, key=lambda i: (medians[i], i))]
    if (memory := choices.current()) is not None:
        memory.keep(device, key, listed, choice)
    return choice
