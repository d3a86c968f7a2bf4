"""Batch-1 GEMV over 8-bit weights with one fp32 scale per output row (FP8 e4m3 or INT8), and over bf16 / fp16
weights (no scale), where it is 1.15-1.49x faster than cuBLAS on S2's shapes (H100, benchmarks/results/gemv-*.md).

y[n] = scale[n] * sum_k x[k] * q[n, k], accumulated in fp32. Each weight is read once, straight from the stored
layout. FP8 uses the hardware conversion on sm_89+; Triton cannot compile float8_e4m3fn for older cards, so there
the kernel decodes the bits with integer operations (exact for every finite e4m3 value). INT8 converts with the
integer-to-float instruction: decoding without it (the byte plus 128 in the mantissa of 2^23, then a subtraction;
three integer and float operations for one quarter-rate conversion) ran 7-19 % slower on every S2 shape (H200,
alternated with this form, benchmarks/results/gemv-nvidia-h200-2026-11-27.md, last section).

Layout: a program holds a [BLOCK_N, BLOCK_K] tile of weights (16-byte loads) and the matching x once for all its
rows, accumulates products elementwise, and reduces across threads only once, at the end.

The gated form reads the same rows of a second weight (the FFN's up projection beside its gate) and stores
SiLU(gate) * up with swiglu.py's arithmetic: one launch where the two GEMVs and the product took three.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from quant.kernels import fp8_native
from quant.kernels.swiglu import silu_mul, silu_times
from quant.kernels.tiles import TILES, Tile, ahead, fastest, stand_in_rows, step_columns


@triton.jit
def _decode_e4m3_bits(q):
    # e4m3 byte -> fp16 with the same sign, exponent and mantissa bits shifted into place. Exponent biases differ
    # by 15 - 7 = 8, so the fp16 value is the e4m3 value times 2^-8, for normal and subnormal values alike;
    # the caller multiplies by 256 once per row.
    b = q.to(tl.uint16)
    h = ((b & 0x7F) << 7) | ((b & 0x80) << 8)
    return h.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _gemv8_kernel(
    x_ptr,  # [K] bf16 / fp16 / fp32
    w_ptr,  # [N, K] int8, float8_e4m3fn (uint8 when FP8_BITS), bf16 or fp16, row-major
    scale_ptr,  # [N] fp32 (SCALED; otherwise w_ptr again, unread)
    up_ptr,  # GATED: the up weight, like w_ptr (otherwise w_ptr again, unread)
    up_scale_ptr,  # GATED: its scales
    y_ptr,  # [N], x's dtype
    N,
    K: tl.constexpr,  # compile-time: the K loop below is unrolled whole
    FP8_BITS: tl.constexpr,
    SCALED: tl.constexpr,  # 8-bit weights times their row scales; float weights have none
    GATED: tl.constexpr,  # y = SiLU(w x) * (up x): the FFN's gate and up projections in one launch
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    out_rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(out_rows, N - 1)  # clamped: every load is in bounds, the store drops the duplicates
    offsets = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        cols = step_columns(k0, offsets, K, BLOCK_K)  # [BLOCK_K]
        q = tl.load(w_ptr + rows[:, None] * K + cols[None, :], eviction_policy="evict_first")  # [BLOCK_N, BLOCK_K]
        if GATED:
            q_up = tl.load(up_ptr + rows[:, None] * K + cols[None, :], eviction_policy="evict_first")
        if k0 + BLOCK_K <= K:
            xk = tl.load(x_ptr + cols)
        else:
            xk = tl.load(x_ptr + k0 + offsets, mask=k0 + offsets < K, other=0.0)
        acc += _decode(q, FP8_BITS) * xk.to(tl.float32)[None, :]
        if GATED:
            acc_up += _decode(q_up, FP8_BITS) * xk.to(tl.float32)[None, :]
    y = _row_sums(acc, scale_ptr, rows, FP8_BITS, SCALED)
    if GATED:
        y = silu_times(y, _row_sums(acc_up, up_scale_ptr, rows, FP8_BITS, SCALED), y_ptr.dtype.element_ty)
    tl.store(y_ptr + out_rows, y.to(y_ptr.dtype.element_ty), mask=out_rows < N)


@triton.jit
def _decode(q, FP8_BITS: tl.constexpr):
    if FP8_BITS:
        return _decode_e4m3_bits(q)
    else:
        return q.to(tl.float32)


@triton.jit
def _row_sums(acc, scale_ptr, rows, FP8_BITS: tl.constexpr, SCALED: tl.constexpr):
    """[BLOCK_N, BLOCK_K] products -> the rows' values, scaled (fp32)."""
    y = tl.sum(acc, axis=1)
    if SCALED:
        y = y * tl.load(scale_ptr + rows)
    if FP8_BITS:
        y = y * 256.0
    return y


# (N, K, weight dtype, bit decode, gated, x dtype, device) -> the tile the first call timed fastest (None: cuBLAS,
# for float weights)
_tiles: dict[tuple, Tile | None] = {}


def gemv8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, fp8_bits: bool | None = None,
          tile: Tile | None = None, up: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [K] @ (weight [N, K] * scale [N, 1]).T -> [N] in x's dtype; with `up` = (weight, scale) of a second layer
    of the same shape and dtype, SiLU(that) * (x @ up's weight.T) instead, in one launch.

    `weight` is int8 or float8_e4m3fn. `fp8_bits` decodes FP8 with integer operations instead of the hardware
    conversion; None picks the conversion where the card has it (sm_89+). `tile` fixes the tile; otherwise the
    first call per shape times every tile on copies of the weights (tiles.fastest) and keeps the quickest.
    """
    n, k = weight.shape
    if weight.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"gemv8 takes int8 or float8_e4m3fn weights, not {weight.dtype}")
    if weight.dtype != torch.float8_e4m3fn:
        fp8_bits = False
    elif fp8_bits is None:
        fp8_bits = weight.is_cuda and not fp8_native(weight.device)
    assert x.shape == (k,) and scale.numel() == n and weight.is_contiguous() and n * k < 2**31
    up_weight, up_scale = up if up is not None else (weight, scale)
    assert up_weight.shape == weight.shape and up_weight.dtype == weight.dtype and up_weight.is_contiguous()
    assert up_scale.numel() == n
    if fp8_bits:
        weight, up_weight = weight.view(torch.uint8), up_weight.view(torch.uint8)
    gated = up is not None
    if tile is None:
        key = (n, k, weight.dtype, fp8_bits, gated, x.dtype, x.device)
        if key not in _tiles:
            tensors = (weight, scale, up_weight, up_scale) if gated else (weight, scale)
            _tiles[key] = fastest(tensors, TILES, _scaled_runner(x, fp8_bits, gated), ("gemv8", *key))
        tile = _tiles[key]
    return _launch(x, weight, scale, up_weight, up_scale, fp8_bits, gated, tile)


def gemv_float(x: torch.Tensor, weight: torch.Tensor, *, up: torch.Tensor | None = None,
               tile: Tile | None = None) -> torch.Tensor:
    """x [K] @ weight [N, K].T -> [N] for bf16 / fp16 weights of x's dtype; with `up` (a second weight like it),
    SiLU(that) * (x @ up.T) instead.

    The first call per shape times the tiles against cuBLAS (F.linear, and for the gated form F.linear twice and
    swiglu's kernel) and keeps the quickest, so a card where cuBLAS wins keeps it; `tile` fixes a tile instead.
    """
    n, k = weight.shape
    assert weight.dtype in (torch.bfloat16, torch.float16) and x.dtype == weight.dtype and x.shape == (k,)
    assert weight.is_contiguous() and n * k < 2**31
    assert up is None or (up.shape == weight.shape and up.dtype == weight.dtype and up.is_contiguous())
    if tile is None:
        key = (n, k, weight.dtype, False, up is not None, x.dtype, x.device)
        if key not in _tiles:
            tensors = (weight,) if up is None else (weight, up)
            _tiles[key] = fastest(tensors, (None, *TILES), _float_runner(x), ("gemv_float", *key))
        tile = _tiles[key]
    return _float(x, weight, up, tile)


def ahead_calls(n: int, k: int, weight_dtype: torch.dtype, x_dtype: torch.dtype, device: torch.device,
                gated: bool = False) -> list[Callable[[], object]]:
    """The compiling calls (tiles.ahead) of the first `gemv8` (int8 / float8_e4m3fn weights) or `gemv_float`
    (bf16 / fp16) of an N x K weight, on zero stand-ins; gated: the form with an up weight alike."""
    x = torch.zeros(k, dtype=x_dtype, device=device)
    rows = stand_in_rows(n)
    if weight_dtype in (torch.bfloat16, torch.float16):
        weight = torch.zeros(rows, k, dtype=weight_dtype, device=device)
        return ahead(("gemv_float", n, k, weight_dtype, False, gated, x_dtype, x.device),
                     (weight, weight) if gated else (weight,), (None, *TILES), _float_runner(x))
    fp8_bits = weight_dtype == torch.float8_e4m3fn and not fp8_native(x.device)
    weight = torch.zeros(rows, k, dtype=torch.uint8 if fp8_bits else weight_dtype, device=device)
    scale = torch.zeros(rows, 1, dtype=torch.float32, device=device)
    tensors = (weight, scale, weight, scale) if gated else (weight, scale)
    return ahead(("gemv8", n, k, weight.dtype, fp8_bits, gated, x_dtype, x.device), tensors, TILES,
                 _scaled_runner(x, fp8_bits, gated))


def _scaled_runner(x: torch.Tensor, fp8_bits: bool, gated: bool) -> Callable[..., torch.Tensor]:
    """run(tile, weight, scale[, up weight, up scale]) -> gemv8's product with that tile."""
    return lambda tile, w, s, *up: _launch(x, w, s, *(up or (w, s)), fp8_bits, gated, tile)


def _float_runner(x: torch.Tensor) -> Callable[..., torch.Tensor]:
    """run(tile or None for cuBLAS, weight[, up weight]) -> gemv_float's product."""
    return lambda tile, w, *up: _float(x, w, up[0] if up else None, tile)


def _float(x: torch.Tensor, weight: torch.Tensor, up: torch.Tensor | None, tile: Tile | None) -> torch.Tensor:
    if tile is None:  # cuBLAS
        if up is None:
            return F.linear(x, weight)
        return silu_mul(F.linear(x, weight), F.linear(x, up))
    return _launch(x, weight, weight, weight if up is None else up, weight, False, up is not None, tile,
                   scaled=False)


def _launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, up_weight: torch.Tensor,
            up_scale: torch.Tensor, fp8_bits: bool, gated: bool, tile: Tile, scaled: bool = True) -> torch.Tensor:
    n, k = weight.shape
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    _gemv8_kernel[(triton.cdiv(n, tile.block_n),)](x, weight, scale, up_weight, up_scale, y, n, k, FP8_BITS=fp8_bits,
                                                   SCALED=scaled, GATED=gated, **tile.launch_args())
    return y


def chosen_tiles() -> dict[tuple, str]:
    """Per key of the first calls so far, the tile they chose (for benchmark reports)."""
    return {key: "cuBLAS" if tile is None else str(tile) for key, tile in _tiles.items()}
