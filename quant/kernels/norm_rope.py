"""One kernel each for the model's RMSNorm and for QK-norm + RoPE, where torch launches 8 and 19-38 small kernels.

A decode frame runs 76 layer steps (36 slow, 4 fast x 10 positions). In eager torch the block norm is 8 kernels
(cast, square, mean, add, rsqrt, multiply, cast, gain) and a slow layer's QK-norm + RoPE of q and k 38 more: on an
H100 these ~3 300 launches of 1-2 us made a third of a graph-replayed frame
(benchmarks/results/decode-profile-*). The arithmetic is the reference's, in the same order and precision
(runtime/model.py: fp32 statistics, the block norm rounded to the activation dtype before its gain, the head
norm's gain in fp32 and one rounding, RoPE over interleaved pairs in fp32 with the bf16 table); only the order of
the sums of squares differs, so results may differ from torch's in the last bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, eps, D: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=inside, other=0.0).to(tl.float32)
    normed = (x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)).to(x_ptr.dtype.element_ty)
    y = normed.to(tl.float32) * tl.load(w_ptr + cols, mask=inside).to(tl.float32)
    tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=inside)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] contiguous, weight [D] of x's dtype -> the block norm of every row, x's dtype."""
    d = x.shape[-1]
    y = torch.empty_like(x)
    _rms_norm_kernel[(x.numel() // d,)](x, weight, y, eps, D=d, BLOCK=triton.next_power_of_2(d))
    return y


@triton.jit
def _norm_rope_kernel(x_ptr, w_ptr, table_ptr, y_ptr, heads, positions, token_stride, eps,
                      HALF: tl.constexpr, HAS_NORM: tl.constexpr):
    program = tl.program_id(0)
    token, head = program // heads, program % heads
    pairs = tl.arange(0, HALF)
    src = x_ptr + token.to(tl.int64) * token_stride + head * (2 * HALF) + 2 * pairs
    x0 = tl.load(src).to(tl.float32)  # x[2j]
    x1 = tl.load(src + 1).to(tl.float32)  # x[2j + 1]
    if HAS_NORM:
        r = tl.rsqrt((tl.sum(x0 * x0, axis=0) + tl.sum(x1 * x1, axis=0)) / (2 * HALF) + eps)
        x0 = (x0 * r * tl.load(w_ptr + 2 * pairs).to(tl.float32)).to(y_ptr.dtype.element_ty).to(tl.float32)
        x1 = (x1 * r * tl.load(w_ptr + 2 * pairs + 1).to(tl.float32)).to(y_ptr.dtype.element_ty).to(tl.float32)
    angle = table_ptr + (token % positions) * (2 * HALF) + 2 * pairs  # [positions, HALF, (cos, sin)]
    cos = tl.load(angle).to(tl.float32)
    sin = tl.load(angle + 1).to(tl.float32)
    dst = y_ptr + program.to(tl.int64) * (2 * HALF) + 2 * pairs
    tl.store(dst, (x0 * cos - x1 * sin).to(y_ptr.dtype.element_ty))
    tl.store(dst + 1, (x1 * cos + x0 * sin).to(y_ptr.dtype.element_ty))


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, table: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] (unit stride over D, heads adjacent, tokens evenly spaced: a view of the fused QKV
    projection), optional head-norm gain [D], table [T, D/2, 2] -> RoPE(head_norm(x)), contiguous, x's dtype."""
    b, t, h, d = x.shape
    y = torch.empty(b, t, h, d, dtype=x.dtype, device=x.device)
    _norm_rope_kernel[(b * t * h,)](x, weight if weight is not None else x, table, y, h, t, x.stride(1), eps,
                                    HALF=d // 2, HAS_NORM=weight is not None)
    return y


def takes(x: torch.Tensor) -> bool:
    """Whether a [B, T, H, D] view has the layout norm_rope reads."""
    b, t, h, d = x.shape
    return (x.stride(3) == 1 and x.stride(2) == d and (b == 1 or x.stride(0) == t * x.stride(1))
            and d % 2 == 0 and d // 2 == triton.next_power_of_2(d // 2))
