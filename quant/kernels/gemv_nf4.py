"""Batch-1 GEMV over NF4 weights in bitsandbytes' packed layout, with the block scales in fp16/fp32.

bitsandbytes packs a weight [N, K] row-major, two 4-bit codes per byte, the even column in the high nibble: for
K even that byte array *is* a [N, K/2] matrix, which the kernel reads as it is stored, 32 bits (8 columns) at a
time. Its double quantization (8-bit block scales) is undone once at load into one scale per block of QBLOCK
columns. The 16 NF4 values are looked up with `tl.gather` from a register table, which Triton lowers to warp
shuffles or shared-memory loads: about 3 instructions per value where a global-memory table costs 5 (SASS counts
for sm_90; the NF4 loop runs at about 11 instructions per weight byte).

y[n] = sum_b absmax[n, b] * sum_{k in block b} code[q[n, k]] * x[k], accumulated in fp32.

Layout: a program reads [BLOCK_N, BLOCK_K / 8] words per (unrolled) step and the matching x once for all its
rows; the 8 products of a word are summed in the thread that holds it, and rows are reduced once, at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quant.kernels.tiles import Tile, autotuned, step_columns


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
):
    NW: tl.constexpr = BLOCK_K // 8  # words per row and step
    KW: tl.constexpr = K // 8  # words per row
    WPB: tl.constexpr = QBLOCK // 8  # words per quantization block
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
        cols = ((w0 + offsets)[:, None] * 8 + t[None, :])[None, :, :]  # [1, NW, 8]
        if w0 + NW <= KW:
            xk = tl.load(x_ptr + cols)
        else:
            xk = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
        idx = (q[:, :, None] >> shift[None, None, :]) & 0xF  # [BLOCK_N, NW, 8]
        v = tl.gather(table, idx.reshape(BLOCK_N * NW * 8), 0).reshape(BLOCK_N, NW, 8)
        acc += tl.sum(v * xk.to(tl.float32), axis=2) * s.to(tl.float32)
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + out_rows, y.to(y_ptr.dtype.element_ty), mask=out_rows < N)


_tuned = autotuned(_gemv_nf4_kernel)


def kernel_accepts(in_features: int, blocksize: int) -> bool:
    """Rows must hold whole quantization blocks made of whole 32-bit words."""
    return in_features % blocksize == 0 and blocksize % 8 == 0


def gemv_nf4(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
             *, tile: Tile | None = None) -> torch.Tensor:
    """x [K] @ dequant(packed [N, K/2] uint8, absmax [N, K/blocksize], code [16]).T -> [N] in x's dtype.

    `tile` fixes the tile instead of autotuning (tests, the CPU interpreter).
    """
    n, half_k = packed.shape
    k = 2 * half_k
    assert packed.dtype == torch.uint8 and packed.is_contiguous() and absmax.is_contiguous()
    assert x.shape == (k,) and absmax.shape == (n, k // blocksize) and kernel_accepts(k, blocksize)
    assert absmax.dtype in (torch.float16, torch.float32) and code.dtype == torch.float32 and code.numel() == 16
    words = packed.view(torch.int32)  # [N, K/8]
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    args = (x, words, absmax, code, y, n, k)
    if tile is None:
        _tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, QBLOCK=blocksize)
    else:
        _gemv_nf4_kernel[(triton.cdiv(n, tile.block_n),)](*args, QBLOCK=blocksize, **tile.launch_args())
    return y
