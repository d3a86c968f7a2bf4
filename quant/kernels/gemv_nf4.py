"""Batch-1 GEMV over NF4 weights in bitsandbytes' packed layout, with the block scales in fp16/fp32.

bitsandbytes packs a weight [N, K] row-major, two 4-bit codes per byte, the even column in the high nibble: for
K even that byte array *is* a [N, K/2] matrix, so the kernel reads the stored bytes as they are. Its double
quantization (8-bit block scales) is undone once at load into one scale per block of QBLOCK columns, so each
step needs one scale per block and no table walk. The 16 NF4 values are looked up in a 64-byte table (L1-resident).

y[n] = sum_b absmax[n, b] * sum_{k in block b} code[q[n, k]] * x[k], accumulated in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quant.kernels.tiles import Tile, autotuned


@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _gemv_nf4_kernel(
    x_ptr,  # [K] bf16 / fp16 / fp32
    w_ptr,  # [N, K // 2] uint8: high nibble = column 2j, low nibble = column 2j + 1
    absmax_ptr,  # [N, K // QBLOCK] fp16 or fp32
    code_ptr,  # [16] fp32, the NF4 values
    y_ptr,  # [N], x's dtype
    N,
    K,
    QBLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    NB: tl.constexpr = BLOCK_K // QBLOCK  # quantization blocks per step
    HB: tl.constexpr = QBLOCK // 2  # bytes per block
    out_rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(out_rows, N - 1)  # clamped: every load is in bounds, the store drops the duplicates
    n_blocks = K // QBLOCK
    w_rows = w_ptr + rows[:, None, None] * (K // 2)  # [BLOCK_N, 1, 1]
    a_rows = absmax_ptr + rows[:, None] * n_blocks  # [BLOCK_N, 1]
    blk = tl.arange(0, NB)
    byte = tl.arange(0, HB)
    acc = tl.zeros([BLOCK_N, NB, HB], dtype=tl.float32)
    for b0 in range(0, n_blocks, NB):
        b = b0 + blk  # [NB] block index within the row
        j = b[:, None] * HB + byte[None, :]  # [NB, HB] byte index within the row
        if EVEN_K:
            q = tl.load(w_rows + j[None, :, :], eviction_policy="evict_first")  # [BLOCK_N, NB, HB]
            s = tl.load(a_rows + b[None, :], eviction_policy="evict_first")  # [BLOCK_N, NB]
            x_even = tl.load(x_ptr + 2 * j, eviction_policy="evict_last")  # [NB, HB]
            x_odd = tl.load(x_ptr + 2 * j + 1, eviction_policy="evict_last")
        else:  # past the end: read the last block again, against x = 0
            bc = tl.minimum(b, n_blocks - 1)
            jc = bc[:, None] * HB + byte[None, :]
            q = tl.load(w_rows + jc[None, :, :], eviction_policy="evict_first")
            s = tl.load(a_rows + bc[None, :], eviction_policy="evict_first")
            ok = (b < n_blocks)[:, None]
            x_even = tl.load(x_ptr + 2 * j, mask=ok, other=0.0, eviction_policy="evict_last")
            x_odd = tl.load(x_ptr + 2 * j + 1, mask=ok, other=0.0, eviction_policy="evict_last")
        q = q.to(tl.int32)
        w_even = tl.load(code_ptr + (q >> 4))
        w_odd = tl.load(code_ptr + (q & 0xF))
        dot = w_even * x_even.to(tl.float32)[None, :, :] + w_odd * x_odd.to(tl.float32)[None, :, :]
        acc += dot * s.to(tl.float32)[:, :, None]
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(y_ptr + out_rows, y.to(y_ptr.dtype.element_ty), mask=out_rows < N)


_tuned = autotuned(_gemv_nf4_kernel)

MIN_BLOCK_K = 256  # the narrowest tile step: a quantization block must fit in it


def kernel_accepts(in_features: int, blocksize: int) -> bool:
    """Rows must hold whole quantization blocks, and a block must fit in a tile step."""
    return in_features % blocksize == 0 and MIN_BLOCK_K % blocksize == 0


def gemv_nf4(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
             *, tile: Tile | None = None) -> torch.Tensor:
    """x [K] @ dequant(packed [N, K/2], absmax [N, K/blocksize], code [16]).T -> [N] in x's dtype.

    `tile` fixes the tile instead of autotuning (tests, the CPU interpreter).
    """
    n, half_k = packed.shape
    k = 2 * half_k
    assert packed.dtype == torch.uint8 and packed.is_contiguous() and absmax.is_contiguous()
    assert x.shape == (k,) and absmax.shape == (n, k // blocksize) and kernel_accepts(k, blocksize)
    assert absmax.dtype in (torch.float16, torch.float32) and code.dtype == torch.float32 and code.numel() == 16
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    if tile is None:
        _tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](x, packed, absmax, code, y, n, k, QBLOCK=blocksize)
    else:
        _gemv_nf4_kernel[(triton.cdiv(n, tile.block_n),)](x, packed, absmax, code, y, n, k, QBLOCK=blocksize,
                                                          **tile.launch_args())
    return y
