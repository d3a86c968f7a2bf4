"""Attention of one decode token over a K/V cache: the slow AR's, reading only the filled slots; and a short prefix
(the fast AR's 1 to 10 positions) in one launch.

A CUDA graph fixes every shape, so the decode step gives SDPA the whole cache [1, kv_heads, capacity, D] with a
mask of the visible slots: its cost follows the capacity (the request's prompt plus its frame budget), not the
position. Here the position is read on the device and the split programs past it return at once, so a step reads
the K/V bytes of the filled slots only (flash-decoding: splits of CHUNK slots per KV head, then one combine).

The fast AR's 10 steps per frame attend over at most 10 positions, 40 calls per frame: there one program per KV
head does it all in one launch (`short_attention`), where SDPA runs flash attention (cuDNN, faster per call on Hopper,
builds a plan per length: runtime/devices.py `skip_cudnn_attention`).

Numerics: scores and the softmax in fp32, the probabilities rounded to the activation dtype for the product with V
(as flash-attention kernels do), accumulated in fp32, one rounding at the end; against fp32 SDPA the error is
SDPA's own on bf16 (relative 2.1e-3, benchmarks/results/decode-attention-*.md). Query head i reads KV head
i // (heads / kv_heads) (SDPA's enable_gqa).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from quant.kernels import FMA

CHUNK = 128  # cache slots per split program
BLOCK = 64  # slots per step inside a program
GROUP_ROWS = 16  # a KV head's query heads, padded to the smallest tl.dot tile
SHORT = 16  # the most visible slots short_attention takes (one tl.dot tile)


# The capacity and the split count follow the request (a multiple of 256, or the plan's --max-context): not
# specialized, so one compiled variant serves every request and can compile before the first
# (runtime/stand_in_frame.py). Likewise the short kernel's count of positions, 1 to 10 within a frame.
@triton.jit(do_not_specialize=["capacity", "splits"])
def _decode_attention_split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, part_ptr, capacity, scale, splits,
                                   GROUP: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                                   ROWS: tl.constexpr):
    """Program (kv head h, split s): the GROUP query heads of h over slots [s*CHUNK, (s+1)*CHUNK) up to the position
    -> running max, sum of exponentials and the unnormalised output, [GROUP, D + 2] fp32 in part[h, s]."""
    h = tl.program_id(0)
    s = tl.program_id(1)
    last = tl.minimum(tl.load(pos_ptr), capacity - 1)  # the position: slots 0..last are visible
    rows = tl.arange(0, ROWS)
    d = tl.arange(0, D)
    first = s * CHUNK
    out = part_ptr + ((h * splits + s) * GROUP + rows[:, None]) * (D + 2)  # [ROWS, 1]
    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    if first <= last:
        q = tl.load(q_ptr + (h * GROUP + rows[:, None]) * D + d[None, :], mask=rows[:, None] < GROUP, other=0.0)
        base = h.to(tl.int64) * capacity * D
        for start in tl.range(first, first + CHUNK, BLOCK):
            slots = start + tl.arange(0, BLOCK)
            seen = slots <= last
            k = tl.load(k_ptr + base + slots[:, None] * D + d[None, :], mask=seen[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale  # [ROWS, BLOCK] fp32
            scores = tl.where(seen[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block past the position: nothing to add
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            l = l * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + base + slots[:, None] * D + d[None, :], mask=seen[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
    keep = rows[:, None] < GROUP
    tl.store(out + d[None, :], acc, mask=keep)
    tl.store(out + D + tl.zeros([ROWS, 1], tl.int32), m[:, None], mask=keep)
    tl.store(out + D + 1 + tl.zeros([ROWS, 1], tl.int32), l[:, None], mask=keep)


@triton.jit(do_not_specialize=["splits"])
def _decode_attention_combine_kernel(part_ptr, o_ptr, splits, GROUP: tl.constexpr, D: tl.constexpr,
                                     SPLITS: tl.constexpr):
    """Program i (a query head): its splits' partial results -> the attention output [D] in o's dtype."""
    i = tl.program_id(0)
    h, g = i // GROUP, i % GROUP
    d = tl.arange(0, D)
    m = tl.full([1], float("-inf"), tl.float32)
    l = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for s0 in tl.range(0, splits, SPLITS):
        s = s0 + tl.arange(0, SPLITS)
        rows = part_ptr + ((h * splits + s) * GROUP + g) * (D + 2)  # [SPLITS]
        inside = s < splits
        m_s = tl.load(rows + D, mask=inside, other=float("-inf"))
        l_s = tl.load(rows + D + 1, mask=inside, other=0.0)
        m_new = tl.maximum(m, tl.max(m_s, axis=0))
        w = tl.where(m_s == float("-inf"), 0.0, tl.exp(m_s - m_new))  # [SPLITS]
        alpha = tl.exp(m - m_new)
        acc_s = tl.load(rows[:, None] + d[None, :], mask=inside[:, None], other=0.0)  # [SPLITS, D]
        acc = acc * alpha + tl.sum(acc_s * w[:, None], axis=0)
        l = l * alpha + tl.sum(l_s * w, axis=0)
        m = m_new
    tl.store(o_ptr + i * D + d, (acc / l).to(o_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["n"])
def _short_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, n, head_stride, scale, GROUP: tl.constexpr,
                            D: tl.constexpr, ROWS: tl.constexpr, SLOTS: tl.constexpr):
    """Program h (a KV head): its GROUP query heads over slots 0..n-1 (n <= SLOTS) -> their outputs [GROUP, D], with
    the split kernel's numerics."""
    h = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    d = tl.arange(0, D)
    slots = tl.arange(0, SLOTS)
    seen = slots < n
    heads = h * GROUP + rows[:, None]  # [ROWS, 1]
    q = tl.load(q_ptr + heads * D + d[None, :], mask=rows[:, None] < GROUP, other=0.0)
    at = h.to(tl.int64) * head_stride + slots[:, None] * D + d[None, :]  # [SLOTS, D]
    k = tl.load(k_ptr + at, mask=seen[:, None], other=0.0)
    scores = tl.where(seen[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))  # [ROWS, SLOTS] fp32
    p = tl.exp(scores - tl.max(scores, axis=1)[:, None])
    v = tl.load(v_ptr + at, mask=seen[:, None], other=0.0)
    acc = tl.dot(p.to(v.dtype), v)  # [ROWS, D] fp32
    tl.store(o_ptr + heads * D + d[None, :], (acc / tl.sum(p, axis=1)[:, None]).to(o_ptr.dtype.element_ty),
             mask=rows[:, None] < GROUP)


def _head_layout(heads: int, kv_heads: int, d: int) -> bool:
    return d >= 16 and d & (d - 1) == 0 and heads % kv_heads == 0 and heads // kv_heads <= GROUP_ROWS


def takes_short(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """One token of one sequence (q [1, heads, 1, D]) over at most SHORT positions k, v [1, kv_heads, n, D] whose
    slots are rows of D (a cache's valid prefix), D a power of two of at least 16, heads a multiple of kv_heads
    with at most GROUP_ROWS per KV head."""
    return (q.shape[0] == 1 and q.shape[2] == 1 and q.is_contiguous() and k.shape[0] == 1 and k.shape[2] <= SHORT
            and v.shape == k.shape and k.stride() == v.stride() and k.stride(3) == 1 and k.stride(2) == k.shape[3]
            and _head_layout(q.shape[1], k.shape[1], q.shape[-1]))


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [1, heads, 1, D] over all n positions of k, v [1, kv_heads, n <= SHORT, D] -> [1, heads, 1, D] in q's
    dtype, with SDPA's default scale 1/sqrt(D). One launch; safe inside CUDA graph capture."""
    heads, kv_heads, n, d = q.shape[1], k.shape[1], k.shape[2], q.shape[-1]
    assert takes_short(q, k, v)
    out = torch.empty(heads, d, dtype=q.dtype, device=q.device)
    _short_attention_kernel[(kv_heads,)](q, k, v, out, n, k.stride(1), 1.0 / math.sqrt(d), GROUP=heads // kv_heads,
                                         D=d, ROWS=GROUP_ROWS, SLOTS=SHORT, num_warps=4, **FMA)
    return out.view(1, heads, 1, d)


def takes(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """One token of one sequence ([1, heads, 1, D] q, [1, kv_heads, capacity, D] contiguous caches), D a power of
    two of at least 16, heads a multiple of kv_heads with at most GROUP_ROWS per KV head."""
    return (q.shape[0] == 1 and q.shape[2] == 1 and k_cache.shape[0] == 1 and k_cache.is_contiguous()
            and _head_layout(q.shape[1], k_cache.shape[1], q.shape[-1]))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     position: torch.Tensor) -> torch.Tensor:
    """q [1, heads, 1, D] over the cache slots 0..position (`position` [1] int64 on the device) of k_cache, v_cache
    [1, kv_heads, capacity, D] -> [1, heads, 1, D] in q's dtype, with SDPA's default scale 1/sqrt(D)."""
    heads, kv_heads, capacity, d = q.shape[1], k_cache.shape[1], k_cache.shape[2], q.shape[-1]
    assert takes(q, k_cache) and v_cache.shape == k_cache.shape and v_cache.is_contiguous()
    group = heads // kv_heads
    splits = triton.cdiv(capacity, CHUNK)
    part = torch.empty(kv_heads, splits, group, d + 2, dtype=torch.float32, device=q.device)
    _decode_attention_split_kernel[(kv_heads, splits)](q.contiguous(), k_cache, v_cache, position, part, capacity,
                                                       1.0 / math.sqrt(d), splits, GROUP=group, D=d, CHUNK=CHUNK,
                                                       BLOCK=BLOCK, ROWS=GROUP_ROWS, num_warps=4, **FMA)
    out = torch.empty(heads, d, dtype=q.dtype, device=q.device)
    _decode_attention_combine_kernel[(heads,)](part, out, splits, GROUP=group, D=d, SPLITS=32, num_warps=1,
                                               **FMA)
    return out.view(1, heads, 1, d)
