"""Batch-1 GEMV over 8-bit weights with one fp32 scale per output row (FP8 e4m3 or INT8).

y[n] = scale[n] * sum_k x[k] * q[n, k], accumulated in fp32. Each weight byte is read once, straight from the
stored layout. FP8 uses the hardware conversion on sm_89+; Triton cannot compile float8_e4m3fn for older cards,
so there the kernel decodes the bits with integer operations (exact for every finite e4m3 value).

Layout: each thread owns groups of 8 consecutive columns of BLOCK_N rows and the 8 matching x values (one
16-byte load), so x is loaded once per thread for all rows and no data crosses threads inside the loop.
K must be a multiple of 8 (every S2 width is).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quant.kernels import fp8_native
from quant.kernels.tiles import Tile, autotuned, clamp_tail


@triton.jit
def _decode_e4m3_bits(q):
    # e4m3 byte -> fp16 with the same sign, exponent and mantissa bits shifted into place. Exponent biases differ
    # by 15 - 7 = 8, so the fp16 value is the e4m3 value times 2^-8, for normal and subnormal values alike;
    # the caller multiplies by 256 once per row.
    b = q.to(tl.uint16)
    h = ((b & 0x7F) << 7) | ((b & 0x80) << 8)
    return h.to(tl.float16, bitcast=True).to(tl.float32)


@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _gemv8_kernel(
    x_ptr,  # [K] bf16 / fp16 / fp32
    w_ptr,  # [N, K] int8 or float8_e4m3fn (uint8 when FP8_BITS), row-major, K % 8 == 0
    scale_ptr,  # [N] fp32
    y_ptr,  # [N], x's dtype
    N,
    K,
    FP8_BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    NG: tl.constexpr = BLOCK_K // 8  # groups of 8 columns per step
    out_rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(out_rows, N - 1)  # clamped: every load is in bounds, the store drops the duplicates
    n_groups = K // 8
    group = tl.arange(0, NG)
    t = tl.arange(0, 8)
    w_rows = w_ptr + rows[:, None, None] * K  # [BLOCK_N, 1, 1]
    acc = tl.zeros([BLOCK_N, NG], dtype=tl.float32)
    # Software pipelining by hand: the next step's weights are requested before this step's arithmetic, so two
    # steps per thread are in flight (Triton pipelines only loads that feed tl.dot).
    gl = clamp_tail(group, n_groups, EVEN_K)
    q_next = tl.load(w_rows + (gl[:, None] * 8 + t[None, :])[None, :, :], eviction_policy="evict_first")
    for g0 in range(0, n_groups, NG):
        gi = g0 + group  # [NG]
        q = q_next  # [BLOCK_N, NG, 8]
        more = g0 + NG + tl.zeros([1, 1, 1], dtype=tl.int32) < n_groups  # [1, 1, 1]: is there a next step
        gl = clamp_tail(gi + NG, n_groups, EVEN_K)
        q_next = tl.load(w_rows + (gl[:, None] * 8 + t[None, :])[None, :, :], mask=more,
                         eviction_policy="evict_first")
        cols = (gi[:, None] * 8 + t[None, :])[None, :, :]  # [1, NG, 8]
        if EVEN_K:
            xk = tl.load(x_ptr + cols, eviction_policy="evict_last")
        else:
            xk = tl.load(x_ptr + cols, mask=cols < K, other=0.0, eviction_policy="evict_last")
        if FP8_BITS:
            w = _decode_e4m3_bits(q)
        else:
            w = q.to(tl.float32)
        acc += tl.sum(w * xk.to(tl.float32), axis=2)  # the 8 columns of a group live in one thread
    y = tl.sum(acc, axis=1) * tl.load(scale_ptr + rows)
    if FP8_BITS:
        y = y * 256.0
    tl.store(y_ptr + out_rows, y.to(y_ptr.dtype.element_ty), mask=out_rows < N)


_tuned = autotuned(_gemv8_kernel)


def kernel_accepts(in_features: int) -> bool:
    """Rows must be made of whole groups of 8 columns."""
    return in_features % 8 == 0


def gemv8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, fp8_bits: bool | None = None,
          tile: Tile | None = None) -> torch.Tensor:
    """x [K] @ (weight [N, K] * scale [N, 1]).T -> [N] in x's dtype.

    `weight` is int8 or float8_e4m3fn. `fp8_bits` decodes FP8 with integer operations instead of the hardware
    conversion; None picks the conversion where the card has it (sm_89+). `tile` fixes the tile instead of
    autotuning (tests, the CPU interpreter).
    """
    n, k = weight.shape
    if weight.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"gemv8 takes int8 or float8_e4m3fn weights, not {weight.dtype}")
    if weight.dtype != torch.float8_e4m3fn:
        fp8_bits = False
    elif fp8_bits is None:
        fp8_bits = weight.is_cuda and not fp8_native(weight.device)
    assert x.shape == (k,) and k % 8 == 0 and scale.numel() == n and weight.is_contiguous() and n * k < 2**31
    w = weight.view(torch.uint8) if fp8_bits else weight
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    if tile is None:
        _tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](x, w, scale, y, n, k, FP8_BITS=fp8_bits)
    else:
        _gemv8_kernel[(triton.cdiv(n, tile.block_n),)](x, w, scale, y, n, k, FP8_BITS=fp8_bits,
                                                       **tile.launch_args())
    return y
