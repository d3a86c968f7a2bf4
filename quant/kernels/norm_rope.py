"""One kernel for the model's RMSNorm (with the residual add before it) and one for an attention's QK-norm + RoPE
of q and k with both K/V cache writes, where torch launches 9 and 40 small kernels.

A decode frame runs 76 layer steps (36 slow, 4 fast x 10 positions). In eager torch the block norm is 8 kernels
(cast, square, mean, add, rsqrt, multiply, cast, gain) and a slow layer's QK-norm + RoPE of q and k 38 more: on an
H100 these ~3 300 launches of 1-2 us made a third of a graph-replayed frame
(benchmarks/results/decode-profile-*). With one kernel each, the residual adds before the norms, the two cache
copies after RoPE and RoPE of q and k as separate launches were the next 380 launches of a frame, so they are
folded in too. The arithmetic is the reference's, in the same order and precision (runtime/model.py: the residual
sum rounded to the activation dtype, fp32 statistics, the block norm rounded before its gain, the head norm's gain
in fp32 and one rounding, RoPE over interleaved pairs in fp32 with the bf16 table); only the order of the sums of
squares differs, so results may differ from torch's in the last bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quant.kernels import FMA


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
                                        BLOCK=triton.next_power_of_2(d), HAS_DELTA=delta is not None, **FMA)


@triton.jit(do_not_specialize=["positions", "first_slot"])  # per request and per step: one variant for all
def _norm_rope_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, table_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                      q_heads, kv_heads, positions, token_stride, cache_head_stride, first_slot, eps,
                      HALF: tl.constexpr, HAS_NORM: tl.constexpr, SLOT_ON_DEVICE: tl.constexpr):
    """One program per (token, head) of q's heads then k's: QK-norm + RoPE; q's head into q_out [T, Hq, D], k's
    into its cache slot, with v's head of the same index copied beside it."""
    program = tl.program_id(0)
    token, head = program // (q_heads + kv_heads), program % (q_heads + kv_heads)
    pairs = tl.arange(0, HALF)
    row = token.to(tl.int64) * token_stride
    slot = first_slot + token
    if SLOT_ON_DEVICE:  # a decode step's position, read on the device (graph replays)
        slot += tl.load(slot_ptr)
    if head < q_heads:
        src = q_ptr + row + head * (2 * HALF)
        w_ptr = qw_ptr
        dst = q_out_ptr + (token.to(tl.int64) * q_heads + head) * (2 * HALF)
    else:
        src = k_ptr + row + (head - q_heads) * (2 * HALF)
        w_ptr = kw_ptr
        cache = slot.to(tl.int64) * (2 * HALF) + (head - q_heads) * cache_head_stride  # [1, Hkv, S, D]
        dst = k_cache_ptr + cache
        cols = tl.arange(0, 2 * HALF)
        tl.store(v_cache_ptr + cache + cols, tl.load(v_ptr + row + (head - q_heads) * (2 * HALF) + cols))
    x0 = tl.load(src + 2 * pairs).to(tl.float32)  # x[2j]
    x1 = tl.load(src + 2 * pairs + 1).to(tl.float32)  # x[2j + 1]
    if HAS_NORM:
        r = tl.rsqrt((tl.sum(x0 * x0, axis=0) + tl.sum(x1 * x1, axis=0)) / (2 * HALF) + eps)
        x0 = (x0 * r * tl.load(w_ptr + 2 * pairs).to(tl.float32)).to(q_out_ptr.dtype.element_ty).to(tl.float32)
        x1 = (x1 * r * tl.load(w_ptr + 2 * pairs + 1).to(tl.float32)).to(q_out_ptr.dtype.element_ty).to(tl.float32)
    angle = table_ptr + (token % positions) * (2 * HALF) + 2 * pairs  # [positions, HALF, (cos, sin)]
    cos = tl.load(angle).to(tl.float32)
    sin = tl.load(angle + 1).to(tl.float32)
    tl.store(dst + 2 * pairs, (x0 * cos - x1 * sin).to(q_out_ptr.dtype.element_ty))
    tl.store(dst + 2 * pairs + 1, (x1 * cos + x0 * sin).to(q_out_ptr.dtype.element_ty))


def rope_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor | None,
             k_weight: torch.Tensor | None, eps: float, table: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
    """q [1, T, Hq, D], k and v [1, T, Hkv, D] (views of the fused QKV projection, as `takes` checks), optional
    head-norm gains [D], table [T, D/2, 2], caches [1, Hkv, S, D] contiguous: in one launch, where norm_rope of q
    and of k and two cache copies took four, RoPE(head_norm(k)) and v are written at slots start..start+T-1 and
    RoPE(head_norm(q)) is returned, contiguous. `start`: an int, or a [1] int64 tensor on the device (a
    graph-replayed step)."""
    _, t, hq, d = q.shape
    hkv = k.shape[2]
    q_out = torch.empty(1, t, hq, d, dtype=q.dtype, device=q.device)
    on_device = isinstance(start, torch.Tensor)
    _norm_rope_kernel[(t * (hq + hkv),)](q, k, v, q if q_weight is None else q_weight,
                                         k if k_weight is None else k_weight, table, q_out, k_cache, v_cache,
                                         start if on_device else q, hq, hkv, t, q.stride(1), k_cache.stride(1),
                                         0 if on_device else start, eps, HALF=d // 2, HAS_NORM=q_weight is not None,
                                         SLOT_ON_DEVICE=on_device, **FMA)
    return q_out


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether q, k, v [1, T, H, D] have the layout rope_qkv reads: each head's D values adjacent, heads adjacent,
    one token stride for all three (a view's stride over a size-1 dimension means nothing: T = 1 has none)."""
    t, d = q.shape[1], q.shape[3]
    return (all(x.shape[0] == 1 and x.shape[1] == t and x.shape[3] == d and x.stride(3) == 1 and x.stride(2) == d
                for x in (q, k, v))
            and (t == 1 or q.stride(1) == k.stride(1) == v.stride(1))
            and d % 2 == 0 and d // 2 == triton.next_power_of_2(d // 2))
