"""One kernel each for the model's RMSNorm (with the residual add before it) and for QK-norm + RoPE (for keys
with the K/V cache writes), where torch launches 9 and 19-40 small kernels.

A decode frame runs 76 layer steps (36 slow, 4 fast x 10 positions). In eager torch the block norm is 8 kernels
(cast, square, mean, add, rsqrt, multiply, cast, gain) and a slow layer's QK-norm + RoPE of q and k 38 more: on an
H100 these ~3 300 launches of 1-2 us made a third of a graph-replayed frame
(benchmarks/results/decode-profile-*). With one kernel each, the residual adds before the norms and the two cache
copies after RoPE were the next 304 launches of a frame, so they are folded in too. The arithmetic is the
reference's, in the same order and precision (runtime/model.py: the residual sum rounded to the activation dtype,
fp32 statistics, the block norm rounded before its gain, the head norm's gain in fp32 and one rounding, RoPE over
interleaved pairs in fp32 with the bf16 table); only the order of the sums of squares differs, so results may
differ from torch's in the last bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, delta_ptr, w_ptr, sum_ptr, y_ptr, eps, D: tl.constexpr, BLOCK: tl.constexpr,
                     HAS_DELTA: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=inside, other=0.0)
    if HAS_DELTA:  # the residual add, rounded to the activation dtype as torch's `x + delta` is
        x = (x.to(tl.float32) + tl.load(delta_ptr + row * D + cols, mask=inside, other=0.0).to(tl.float32))
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * D + cols, x, mask=inside)
    x = x.to(tl.float32)
    normed = (x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)).to(x_ptr.dtype.element_ty)
    y = normed.to(tl.float32) * tl.load(w_ptr + cols, mask=inside).to(tl.float32)
    tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=inside)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] contiguous, weight [D] of x's dtype -> the block norm of every row, x's dtype."""
    y = torch.empty_like(x)
    _launch_rms_norm(x, None, weight, eps, x, y)
    return y


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm in one launch: x, delta [..., D] contiguous, same dtype ->
    (x + delta, its block norm)."""
    total, y = torch.empty_like(x), torch.empty_like(x)
    _launch_rms_norm(x, delta, weight, eps, total, y)
    return total, y


def _launch_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     total: torch.Tensor, y: torch.Tensor) -> None:
    d = x.shape[-1]
    _rms_norm_kernel[(x.numel() // d,)](x, x if delta is None else delta, weight, total, y, eps, D=d,
                                        BLOCK=triton.next_power_of_2(d), HAS_DELTA=delta is not None)


@triton.jit
def _norm_rope_kernel(x_ptr, w_ptr, table_ptr, y_ptr, v_ptr, v_out_ptr, slot_ptr, heads, positions, token_stride,
                      out_token_stride, out_head_stride, first_slot, eps, HALF: tl.constexpr,
                      HAS_NORM: tl.constexpr, COPY_V: tl.constexpr, SLOT_ON_DEVICE: tl.constexpr):
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
    slot = first_slot + token
    if SLOT_ON_DEVICE:  # a decode step's position, read on the device (graph replays)
        slot += tl.load(slot_ptr)
    out = slot.to(tl.int64) * out_token_stride + head * out_head_stride
    tl.store(y_ptr + out + 2 * pairs, (x0 * cos - x1 * sin).to(y_ptr.dtype.element_ty))
    tl.store(y_ptr + out + 2 * pairs + 1, (x1 * cos + x0 * sin).to(y_ptr.dtype.element_ty))
    if COPY_V:  # v of the same token and head, to the same place in its cache
        cols = tl.arange(0, 2 * HALF)
        v = tl.load(v_ptr + token.to(tl.int64) * token_stride + head * (2 * HALF) + cols)
        tl.store(v_out_ptr + out + cols, v)


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, table: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] (unit stride over D, heads adjacent, tokens evenly spaced: a view of the fused QKV
    projection), optional head-norm gain [D], table [T, D/2, 2] -> RoPE(head_norm(x)), contiguous, x's dtype."""
    b, t, h, d = x.shape
    y = torch.empty(b, t, h, d, dtype=x.dtype, device=x.device)
    _norm_rope_kernel[(b * t * h,)](x, weight if weight is not None else x, table, y, x, y, x, h, t, x.stride(1),
                                    h * d, d, 0, eps, HALF=d // 2, HAS_NORM=weight is not None, COPY_V=False,
                                    SLOT_ON_DEVICE=False)
    return y


def rope_into_cache(k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor | None, eps: float, table: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, start: int | torch.Tensor) -> None:
    """k, v [1, T, H, D] (views as norm_rope reads, with equal strides), table [T, D/2, 2], caches [1, H, S, D]
    contiguous: RoPE(head_norm(k)) and v written at slots start..start+T-1 in one launch, where norm_rope and
    two cache copies took three. `start`: an int, or a [1] int64 tensor on the device (a graph-replayed step)."""
    _, t, h, d = k.shape
    on_device = isinstance(start, torch.Tensor)
    _norm_rope_kernel[(t * h,)](k, weight if weight is not None else k, table, k_cache, v, v_cache,
                                start if on_device else k, h, t, k.stride(1), d, k_cache.stride(1),
                                0 if on_device else start, eps, HALF=d // 2, HAS_NORM=weight is not None,
                                COPY_V=True, SLOT_ON_DEVICE=on_device)


def takes(x: torch.Tensor) -> bool:
    """Whether a [B, T, H, D] view has the layout norm_rope reads."""
    b, t, h, d = x.shape
    return (x.stride(3) == 1 and x.stride(2) == d and (b == 1 or x.stride(0) == t * x.stride(1))
            and d % 2 == 0 and d // 2 == triton.next_power_of_2(d // 2))
