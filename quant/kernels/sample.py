"""One launch per token draw: the whole of runtime/sampling.py's rule for one row of logits, where torch takes ~17
launches (top-k alone, two kernels of ~16 us on an H100 for a 4 097-wide row, was 0.35 ms of a decode frame).

Per row, in one program: the full-vocabulary log-sum-exp; the top_k largest logits found by bisection on an
order-preserving integer key (one counting pass over the row per significant bit, 16 for bf16; no sort), ties at
the cut taken lowest index first; the candidates compacted into a small scratch row and ranked there by
comparing every pair; the cumulative mass of the untempered softmax in rank order, rank r dropped if it exceeds
top_p (rank 0 always kept); the tempered softmax of the survivors; and the exponential race (argmax p / E, with
E the caller's Exp(1) noise in rank order, exactly as the torch path uses it). The sums run in another order than
torch's sort, cumsum and softmax, so a draw whose race or top_p cut is decided in the last bits may differ;
otherwise, fed the same noise, both pick the same token (tests/test_sample_kernel.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from quant.kernels import FMA

MAX_TOP_K = 128  # candidates are ranked pairwise: [KP, KP] in one program
MAX_VOCAB = 16384  # the whole row lives in registers of one program
LOW_BIT = {torch.bfloat16: 16, torch.float16: 13}  # float32 bits below these are zero: no need to search them


@triton.jit
def _sample_kernel(logits_ptr, noise_ptr, value_ptr, index_ptr, out_ptr, V, row_stride, top_p, temperature,
                   K: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr, LOW_BIT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + row * row_stride + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    top = tl.max(x, axis=0)
    lse = top + tl.log(tl.sum(libdevice.exp(x - top), axis=0))
    # uint32 keys in the order of the floats: positives get the sign bit set, negatives are inverted
    bits = x.to(tl.uint32, bitcast=True)
    key = bits ^ tl.where((bits >> 31) != 0, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    key = (key >> LOW_BIT) << LOW_BIT  # only -inf's key has lower bits set: put every key on the searched grid
    cut = tl.zeros((), dtype=tl.uint32)  # the largest t with at least K keys >= t: the K-th largest key
    for bit in range(31, LOW_BIT - 1, -1):  # the keys' lower bits are zero for bf16 / fp16 logits
        trial = cut | (tl.full((), 1, tl.uint32) << bit)
        cut = tl.where(tl.sum((key >= trial).to(tl.int32), axis=0) >= K, trial, cut)
    above = key > cut
    tie = key == cut
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=0) - 1  # ties at the cut: lowest index first
    chosen = above | (tie & (tie_rank < K - tl.sum(above.to(tl.int32), axis=0)))  # exactly K
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(value_ptr + row * KP + slot, x, mask=chosen)
    tl.store(index_ptr + row * KP + slot, cols, mask=chosen)
    tl.debug_barrier()  # the scratch row is written and read by different threads of this program
    j = tl.arange(0, KP)
    valid = j < K
    v = tl.load(value_ptr + row * KP + j, mask=valid, other=float("-inf"))
    idx = tl.load(index_ptr + row * KP + j, mask=valid, other=0)
    # before[i, j]: candidate j ranks ahead of candidate i
    before = valid[None, :] & ((v[None, :] > v[:, None]) | ((v[None, :] == v[:, None]) & (idx[None, :] < idx[:, None])))
    rank = tl.sum(before.to(tl.int32), axis=1)
    p = libdevice.exp(v - lse)
    cum = tl.sum(tl.where(before, p[None, :], 0.0), axis=1) + p
    keep = valid & ((rank == 0) | (cum <= top_p))
    scaled = tl.where(keep, tl.math.div_rn(v, temperature), float("-inf"))
    e = libdevice.exp(scaled - tl.max(scaled, axis=0))
    probs = e / tl.sum(e, axis=0)
    noise = tl.load(noise_ptr + row * K + rank, mask=valid, other=1.0)
    score = tl.where(keep, probs / noise, 0.0)
    best = tl.argmax(score, axis=0)
    tl.store(out_ptr + row, tl.sum(tl.where(j == best, idx, 0), axis=0).to(tl.int64))


def takes(logits: torch.Tensor, k: int) -> bool:
    """Whether the kernel serves these logits [..., V] with k = min(top_k, V) candidates."""
    return k <= MAX_TOP_K and logits.shape[-1] <= MAX_VOCAB and logits.stride(-1) == 1


def sample_rows(logits: torch.Tensor, noise: torch.Tensor, top_p: float, temperature: float) -> torch.Tensor:
    """logits [..., V] (unit stride over V), noise [..., K] fp32 Exp(1) draws in rank order -> token [...] int64."""
    v, k = logits.shape[-1], noise.shape[-1]
    rows = logits.reshape(-1, v)
    noise = noise.reshape(-1, k).float().contiguous()
    kp = max(16, triton.next_power_of_2(k))
    values = torch.empty(rows.shape[0], kp, dtype=torch.float32, device=logits.device)
    indices = torch.empty(rows.shape[0], kp, dtype=torch.int32, device=logits.device)
    out = torch.empty(rows.shape[0], dtype=torch.int64, device=logits.device)
    block = triton.next_power_of_2(v)
    _sample_kernel[(rows.shape[0],)](rows, noise, values, indices, out, v, rows.stride(0), top_p, temperature, K=k,
                                     BLOCK=block, KP=kp, LOW_BIT=LOW_BIT.get(logits.dtype, 0),
                                     num_warps=8 if block >= 4096 else 4, **FMA)
    return out.view(logits.shape[:-1])
