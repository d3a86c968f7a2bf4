"""Batch-1 GEMV over NF4 weights in bitsandbytes' packed layout, with the block scales in fp16/fp32.

bitsandbytes packs a weight [N, K] row-major, two 4-bit codes per byte, the even column in the high nibble: for
K even that byte array *is* a [N, K/2] matrix, which the kernel reads as it is stored, 32 bits (8 columns) at a
time. Its double quantization (8-bit block scales) is undone once at load into one scale per block of QBLOCK
columns.

y[n] = sum_b absmax[n, b] * sum_{k in block b} code[q[n, k]] * x[k], accumulated in fp32.

The kernel is bound by instruction issue, and the lookup of the 16 NF4 values is most of it. Two ways, chosen per
shape with the tile (benchmarks/results/gemv-*.md):
- gather: `tl.gather` from a [16] register table; Triton lowers it to warp shuffles plus index arithmetic;
- shuffle (bf16 x only): one `shfl.sync` per value straight from the code's bits. Every lane holds code[lane % 16]
  (read inside the same asm, so it is right whatever layout the compiler gives the word tensor), and a shuffle
  reads only the low 5 bits of its lane index, so `word >> 4i` needs no mask. About 30 % fewer instructions per
  weight; it wins where one warp per row keeps every SM busy (N = 2 560 on an H100).

A third way, gemv_nf4_ptx.py (persistent programs with a generated-PTX inner loop), is one more candidate: the
first call per shape times every Triton configuration and PTX plan the input allows, on copies of the weight read
from DRAM as in decode (tiles.fastest), and keeps the quickest. Its gated form (`gemv_nf4_gated`: the FFN's gate
and up projections and SiLU x up in one launch) is timed against those three launches the same way.

Layout: a program reads [BLOCK_N, BLOCK_K / 8] words per (unrolled) step and the matching x once for all its
rows; the 8 products of a word are summed in the thread that holds it, and rows are reduced once, at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl

from quant.kernels import gemv_nf4_ptx
from quant.kernels.swiglu import silu_mul
from quant.kernels.tiles import TILES, Tile, ahead, fastest, stand_in_rows, step_columns

# One word [BLOCK_N, NW] int32 ($8) and the code table's address ($9) -> the word's 8 NF4 values, nibble order
# (value i from bits 4i..4i+3). ptxas hoists the lane's table read out of the unrolled loop (one LDG per kernel).
_SHUFFLE_ASM = tl.constexpr("""
{
.reg .u32 lane;
.reg .u64 addr;
.reg .b32 table, q1, q2, q3, q4, q5, q6, q7;
mov.u32 lane, %laneid;
and.b32 lane, lane, 15;
mul.wide.u32 addr, lane, 4;
add.u64 addr, addr, $9;
ld.global.nc.b32 table, [addr];
shr.b32 q1, $8, 4;
shr.b32 q2, $8, 8;
shr.b32 q3, $8, 12;
shr.b32 q4, $8, 16;
shr.b32 q5, $8, 20;
shr.b32 q6, $8, 24;
shr.b32 q7, $8, 28;
shfl.sync.idx.b32 $0, table, $8, 0x1f, 0xffffffff;
shfl.sync.idx.b32 $1, table, q1, 0x1f, 0xffffffff;
shfl.sync.idx.b32 $2, table, q2, 0x1f, 0xffffffff;
shfl.sync.idx.b32 $3, table, q3, 0x1f, 0xffffffff;
shfl.sync.idx.b32 $4, table, q4, 0x1f, 0xffffffff;
shfl.sync.idx.b32 $5, table, q5, 0x1f, 0xffffffff;
shfl.sync.idx.b32 $6, table, q6, 0x1f, 0xffffffff;
shfl.sync.idx.b32 $7, table, q7, 0x1f, 0xffffffff;
}
""")


@triton.jit
def _bf16_pair(pair):
    """An int32 holding two bf16 values -> (low, high) as fp32 (a bf16 is the high half of an fp32)."""
    return (pair << 16).to(tl.float32, bitcast=True), (pair & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _shuffle_word_dot(q, code_ptr, x_ptr, words, w0, NW: tl.constexpr, KW: tl.constexpr):
    """sum over each word's 8 columns of code[nibble] * x: [BLOCK_N, NW] fp32. x_ptr: bf16 x as int32 pairs."""
    values = tl.inline_asm_elementwise(_SHUFFLE_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,l", [q, code_ptr + tl.zeros_like(q)],
                                       dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    pairs = tl.load(x_ptr + words[:, None] * 4 + tl.arange(0, 4)[None, :])  # [NW, 4]: one 16-byte load per word
    if w0 + NW > KW:
        pairs = tl.where((w0 + tl.arange(0, NW) < KW)[:, None], pairs, 0)
    p02, p13 = tl.split(pairs.reshape(NW, 2, 2))
    p0, p2 = tl.split(p02)
    p1, p3 = tl.split(p13)
    part = tl.zeros(q.shape, dtype=tl.float32)
    for j in tl.static_range(4):
        p = p0 if j == 0 else p1 if j == 1 else p2 if j == 2 else p3
        x_even, x_odd = _bf16_pair(p)  # columns 8w + 2j and 8w + 2j + 1: the high and low nibble of byte j
        part += values[2 * j + 1] * x_even[None, :] + values[2 * j] * x_odd[None, :]
    return part


@triton.jit
def _gemv_nf4_kernel(
    x_ptr,  # [K] bf16 / fp16 / fp32
    w_ptr,  # [N, K // 8] int32 words, row-major; byte j of a word: column 2j high nibble, 2j + 1 low
    absmax_ptr,  # [N, K // QBLOCK] fp16 or fp32
    code_ptr,  # [16] fp32, the NF4 values
    y_ptr,  # [N], x's dtype
    N,
    K: tl.constexpr,  # compile-time: the K loop below is unrolled whole
    QBLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SHUFFLE: tl.constexpr,  # look values up with shfl.sync (bf16 x only; otherwise the gather is used)
):
    NW: tl.constexpr = BLOCK_K // 8  # words per row and step
    KW: tl.constexpr = K // 8  # words per row
    WPB: tl.constexpr = QBLOCK // 8  # words per quantization block
    USE_SHUFFLE: tl.constexpr = SHUFFLE and x_ptr.dtype.element_ty == tl.bfloat16
    out_rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(out_rows, N - 1)  # clamped: every load is in bounds, the store drops the duplicates
    offsets = tl.arange(0, NW)
    t = tl.arange(0, 8)
    shift = (t ^ 1) * 4  # [8]: column 8w + t sits at bits shift[t] of word w (little-endian bytes)
    table = tl.load(code_ptr + tl.arange(0, 16))  # [16]
    acc = tl.zeros([BLOCK_N, NW], dtype=tl.float32)
    for w0 in tl.static_range(0, KW, NW):
        words = step_columns(w0, offsets, KW, NW)  # [NW]
        q = tl.load(w_ptr + rows[:, None] * KW + words[None, :], eviction_policy="evict_first")  # [BLOCK_N, NW]
        s = tl.load(absmax_ptr + rows[:, None] * (K // QBLOCK) + (words // WPB)[None, :])  # each word's block scale
        if USE_SHUFFLE:
            part = _shuffle_word_dot(q, code_ptr, x_ptr.to(tl.pointer_type(tl.int32), bitcast=True), words, w0,
                                     NW, KW)
        else:
            cols = ((w0 + offsets)[:, None] * 8 + t[None, :])[None, :, :]  # [1, NW, 8]
            if w0 + NW <= KW:
                xk = tl.load(x_ptr + cols)
            else:
                xk = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
            idx = (q[:, :, None] >> shift[None, None, :]) & 0xF  # [BLOCK_N, NW, 8]
            v = tl.gather(table, idx.reshape(BLOCK_N * NW * 8), 0).reshape(BLOCK_N, NW, 8)
            part = tl.sum(v * xk.to(tl.float32), axis=2)
        acc += part * s.to(tl.float32)
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + out_rows, y.to(y_ptr.dtype.element_ty), mask=out_rows < N)


@dataclass(frozen=True)
class TritonChoice:
    """The Triton kernel above with a tile and a lookup (`shuffle`: bf16 x only)."""

    tile: Tile
    shuffle: bool = False

    def __str__(self) -> str:
        return f"Triton {self.tile}" + (", shuffle lookup" if self.shuffle else "")


# The shared tiles with the gather, and the shuffle's winner on the N = 2 560 shapes before the PTX kernel. Its
# 2-row, 128-column tile is left out: it won no S2 shape on the H100, and compiling it took 30 s of the 53 s these
# candidates took for the three S2 Ks (triton 3.6, sm_90; benchmarks/results/kernel-choice-*.md).
TRITON_CHOICES: tuple[TritonChoice, ...] = (*(TritonChoice(tile) for tile in TILES), TritonChoice(Tile(1, 256, 1), True))


def kernel_accepts(in_features: int, blocksize: int) -> bool:
    """Rows must hold whole quantization blocks made of whole 32-bit words."""
    return in_features % blocksize == 0 and blocksize % 8 == 0


def gemv_nf4(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
             *, tile: Tile | None = None, shuffle: bool = False) -> torch.Tensor:
    """x [K] @ dequant(packed [N, K/2] uint8, absmax [N, K/blocksize], code [16]).T -> [N] in x's dtype.

    `tile` (and `shuffle`, the lookup) fix the Triton kernel's configuration (tests, the CPU interpreter, which runs
    no inline asm); otherwise the first call per shape times the Triton configurations and the PTX plans on copies
    of the weight (tiles.fastest) and keeps the quickest.
    """
    n, half_k = packed.shape
    k = 2 * half_k
    assert packed.dtype == torch.uint8 and packed.is_contiguous() and absmax.is_contiguous()
    assert x.shape == (k,) and absmax.shape == (n, k // blocksize) and kernel_accepts(k, blocksize)
    assert absmax.dtype in (torch.float16, torch.float32) and code.dtype == torch.float32 and code.numel() == 16
    words = packed.view(torch.int32)  # [N, K/8]
    if x.data_ptr() % 16:
        x = x.clone()  # a view at an odd offset: the kernels read x as 16-byte vectors of bf16 pairs
    if tile is not None:
        return _run(TritonChoice(tile, shuffle), x, words, absmax, code, blocksize)
    key = (n, k, blocksize, absmax.dtype, x.dtype, x.device)
    if key not in _choice:
        _choice[key] = fastest((words, absmax), candidates(x, k, blocksize), _runner(x, code, blocksize),
                               ("gemv_nf4", *key))
    return _run(_choice[key], x, words, absmax, code, blocksize)


def ahead_calls(n: int, k: int, blocksize: int, scale_dtype: torch.dtype, x_dtype: torch.dtype,
                device: torch.device, gated: bool = False) -> list[Callable[[], object]]:
    """The compiling calls (tiles.ahead) of the first `gemv_nf4` (gated: `gemv_nf4_gated`) of an N x K weight, on
    zero stand-ins. The gated form's first call also times the plain GEMVs at N x K: the same kernels."""
    x = torch.zeros(k, dtype=x_dtype, device=device)
    code = torch.zeros(16, dtype=torch.float32, device=device)
    rows = stand_in_rows(n)
    words = torch.zeros(rows, k // 8, dtype=torch.int32, device=device)
    absmax = torch.zeros(rows, k // blocksize, dtype=scale_dtype, device=device)
    if not gated:
        return ahead(("gemv_nf4", n, k, blocksize, scale_dtype, x_dtype, x.device), (words, absmax),
                     candidates(x, k, blocksize), _runner(x, code, blocksize))
    if not gemv_nf4_ptx.accepts(x, k, blocksize):
        return []
    return ahead(("gemv_nf4_gated", n, k, blocksize, scale_dtype, x.device), (words, absmax, words, absmax),
                 [None, *gated_plans(k)], _gated_runner(x, code, blocksize))


def candidates(x: torch.Tensor, k: int, blocksize: int) -> list[TritonChoice | gemv_nf4_ptx.Plan]:
    """What the first call times for x and K: the Triton gather tiles, and the PTX plans that apply (bf16 x on CUDA,
    K in whole units per warp) or else the Triton shuffle tile (bf16 x). That tile does what the plans do, scheduled
    less well: it lost to a plan on every S2 shape in every H100 run, and at K = 9 728 it was the slowest candidate
    to compile (4.3 s CPU-side, triton 3.6, sm_90), which bounds the first call now that they compile in parallel
    (benchmarks/results/kernel-choice-*.md)."""
    plans = [plan for plan in gemv_nf4_ptx.PLANS if plan.fits(k)] if gemv_nf4_ptx.accepts(x, k, blocksize) else []
    shuffle = x.dtype == torch.bfloat16 and not plans
    return [choice for choice in TRITON_CHOICES if not choice.shuffle or shuffle] + plans


def _runner(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> Callable[..., torch.Tensor]:
    """run(choice, words, absmax) -> x @ dequant(that weight).T with the configuration `choice`."""
    return lambda choice, words, absmax: _run(choice, x, words, absmax, code, blocksize)


def _run(choice: TritonChoice | gemv_nf4_ptx.Plan, x: torch.Tensor, words: torch.Tensor, absmax: torch.Tensor,
         code: torch.Tensor, blocksize: int) -> torch.Tensor:
    if isinstance(choice, gemv_nf4_ptx.Plan):
        return gemv_nf4_ptx.gemv_nf4_ptx(x, words, absmax, code, blocksize, choice)
    n, k = words.shape[0], 8 * words.shape[1]
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    _gemv_nf4_kernel[(triton.cdiv(n, choice.tile.block_n),)](x, words, absmax, code, y, n, k, QBLOCK=blocksize,
                                                             SHUFFLE=choice.shuffle, **choice.tile.launch_args())
    return y


# (N, K, block size, scale dtype, x dtype, device) -> the configuration the first call timed quickest.
_choice: dict[tuple, TritonChoice | gemv_nf4_ptx.Plan] = {}
# (N, K, block size, scale dtype, device) -> the PTX plan whose gated form beat the two GEMVs and silu_mul, or None.
_gated_plan: dict[tuple, gemv_nf4_ptx.Plan | None] = {}


def gemv_nf4_gated(x: torch.Tensor, gate: tuple[torch.Tensor, torch.Tensor], up: tuple[torch.Tensor, torch.Tensor],
                   code: torch.Tensor, blocksize: int) -> torch.Tensor | None:
    """SiLU(x @ dequant(gate).T) * (x @ dequant(up).T) in one launch: gate and up each (packed [N, K/2] uint8,
    absmax [N, K/blocksize]) of the same shape, sharing `code`; None where that form does not apply or the first
    call's timing found the three launches faster (the caller runs them)."""
    (packed, absmax), (up_packed, up_absmax) = gate, up
    n, k = packed.shape[0], 2 * packed.shape[1]
    if (up_packed.shape != packed.shape or up_absmax.shape != absmax.shape or up_absmax.dtype != absmax.dtype
            or not gemv_nf4_ptx.accepts(x, k, blocksize)):
        return None
    words, up_words = packed.view(torch.int32), up_packed.view(torch.int32)
    key = (n, k, blocksize, absmax.dtype, x.device)
    if key not in _gated_plan:
        _gated_plan[key] = fastest((words, absmax, up_words, up_absmax), [None, *gated_plans(k)],
                                   _gated_runner(x, code, blocksize), ("gemv_nf4_gated", *key))
    plan = _gated_plan[key]
    if plan is None:
        return None
    return gemv_nf4_ptx.gemv_nf4_ptx(x, words, absmax, code, blocksize, plan, up=(up_words, up_absmax))


def gated_plans(k: int) -> list[gemv_nf4_ptx.Plan]:
    """The PTX plans with a gated form at K (two rows per item: the gate's row and the up weight's)."""
    return [plan for plan in gemv_nf4_ptx.PLANS if plan.rows == 2 and plan.fits(k)]


def _gated_runner(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> Callable[..., torch.Tensor]:
    """run(plan, words, absmax, up words, up absmax) -> the gated product; plan None: the three launches."""
    def run(plan: gemv_nf4_ptx.Plan | None, w: torch.Tensor, a: torch.Tensor, uw: torch.Tensor,
            ua: torch.Tensor) -> torch.Tensor:
        if plan is None:
            return silu_mul(gemv_nf4(x, w.view(torch.uint8), a, code, blocksize),
                            gemv_nf4(x, uw.view(torch.uint8), ua, code, blocksize))
        return gemv_nf4_ptx.gemv_nf4_ptx(x, w, a, code, blocksize, plan, up=(uw, ua))

    return run


def chosen_paths() -> dict[tuple, str]:
    """Per key of the first calls so far, the configuration they chose (for benchmark reports)."""
    return {key: f"PTX {choice}" if isinstance(choice, gemv_nf4_ptx.Plan) else str(choice)
            for key, choice in _choice.items()}
