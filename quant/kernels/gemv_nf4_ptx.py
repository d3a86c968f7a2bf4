"""Batch-1 NF4 GEMV with a generated-PTX inner loop: persistent warps over row pairs, K optionally split.

Why a second NF4 kernel: on an H100 the Triton kernel (gemv_nf4.py) spends 1.1-2.7 us per call above the time it
takes merely to read the same bytes (benchmarks/results/nf4-gemv-experiments-*.md). That gap is neither the lookup
(shuffles replaced by ALU ops changed it by under 10 %) nor instruction count (a third fewer instructions gained
0-8 %): with one wave of one-warp programs every warp loads all its words at once and computes after its data
arrive, so the arithmetic runs after the memory traffic instead of under it. Persistent programs that loop over
row groups drift into different phases and overlap the two. ptxas is free to sink loads into the arithmetic, and
did so for an equivalent way of writing the pointers below (10-20 % slower): keep their form. Where the weight
loads go matters both ways: issuing all of them first (a dependency, or cp.async into shared memory) ran 10-25 %
slower than ptxas's placement, and the `.lu` (last use) loads, which ptxas places a little later than
`L1::evict_first` ones, ran 0-2 % faster on every S2 shape (benchmarks/results/nf4-gemv-experiments-*.md).

Layout (bitsandbytes' packed rows, read as int32 words; see gemv_nf4.py): each lane owns 16-column units
u = lane + 32 i of a row (one 8-byte load of two words, two 16-byte loads of bf16 x, one block scale) and keeps
one fp32 partial sum per row; the warp sums its lanes at the end. The unit loop is unrolled in PTX, generated per
(K, block size, rows, scale dtype), so every load has an immediate offset and no address arithmetic remains. The
NF4 value of a nibble is a `shfl.sync` from the lane holding code[lane % 16] (a shuffle reads only the low 5 bits
of its index, so `word >> 4i` needs no mask). With `warps` > 1 the warps of a program take equal slices of K for
the same rows (more, shorter work items for the N = 2 560 shapes), summed through shared memory by Triton.

CUDA only (inline PTX), bf16 x only, K a multiple of 512 per warp, block sizes dividing 512.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

UNIT = 16  # columns per lane and unit: two int32 words of packed nibbles
WARP_COLUMNS = 32 * UNIT  # columns one warp covers per unit step


@dataclass(frozen=True)
class Plan:
    """`rows` output rows per work item (1 or 2), `warps` per program splitting K, `per_sm` programs per SM,
    `chains`: independent fp32 sums a unit's 16 products are split over (1, 2 or 4)."""

    rows: int
    warps: int
    per_sm: int
    chains: int = 1

    def fits(self, k: int) -> bool:
        return k % (self.warps * WARP_COLUMNS) == 0


# The configurations that won an S2 shape in sweeps on an H100 (rows 1-4, 1-4 warps, 4-32 programs per SM, 1-4
# chains): 4096x2560 at 16/SM, 9728x2560 at 20, 6144x2560 at 24 with 2 chains (64 registers: 24 fit on an SM),
# 2560x4096 with K split over 2 warps. ptxas schedules each differently; the chooser times them per shape.
PLANS: tuple[Plan, ...] = (Plan(2, 1, 16), Plan(2, 1, 20), Plan(2, 1, 24, chains=2), Plan(2, 2, 16))


def accepts(x: torch.Tensor, k: int, blocksize: int) -> bool:
    """The kernel's preconditions beyond the plan: bf16 x on CUDA, 16-byte aligned; whole units per scale block."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and x.data_ptr() % 16 == 0 and k % WARP_COLUMNS == 0
            and WARP_COLUMNS % blocksize == 0 and blocksize % UNIT == 0)


@functools.cache
def row_slice_ptx(k: int, blocksize: int, rows: int, scale_f32: bool, chains: int = 1) -> str:
    """PTX for one lane over a K-column slice of `rows` rows; a unit's products summed in `chains` chains.

    Operands: $0..$rows-1 the fp32 partial sums (out); then x (this lane's first unit), the code table, and per row
    its packed words and scales (this lane's first unit).
    """
    units = k // WARP_COLUMNS
    scale_bytes = 4 if scale_f32 else 2
    x_ptr, code_ptr = f"${rows}", f"${rows + 1}"
    lines = ["{", ".reg .u32 lane;", ".reg .u64 ta;", ".reg .b32 tbl;",
             ".reg .f32 " + ", ".join(f"acc{r}" for r in range(rows)) + ";",
             f".reg .b32 w<{2 * units * rows}>, s<{units * rows}>;",
             "mov.u32 lane, %laneid;", "and.b32 lane, lane, 15;", "mul.wide.u32 ta, lane, 4;",
             f"add.u64 ta, ta, {code_ptr};", "ld.global.nc.b32 tbl, [ta];"]
    if not scale_f32:
        lines.append(f".reg .b16 h<{units * rows}>;")
    lines += [f"mov.f32 acc{r}, 0f00000000;" for r in range(rows)]
    for i in range(units):  # every weight load first in the PTX; ptxas moves some later (module docstring)
        for r in range(rows):
            u, words, scales = i * rows + r, f"${rows + 2 + 2 * r}", f"${rows + 3 + 2 * r}"
            lines.append(f"ld.global.lu.v2.b32 {{w{2 * u}, w{2 * u + 1}}}, [{words}+{8 * 32 * i}];")
            offset = WARP_COLUMNS * i // blocksize * scale_bytes
            lines.append(f"ld.global.nc.b32 s{u}, [{scales}+{offset}];" if scale_f32
                         else f"ld.global.nc.b16 h{u}, [{scales}+{offset}];")
    for i in range(units):
        sums = [f"sum{c}" for c in range(chains)]
        lines += ["{", ".reg .b32 p<8>, xl<8>, xh<8>, n<16>, v<16>, sf;", f".reg .f32 {', '.join(sums)};",
                  f"ld.global.nc.v4.b32 {{p0, p1, p2, p3}}, [{x_ptr}+{2 * WARP_COLUMNS * i}];",
                  f"ld.global.nc.v4.b32 {{p4, p5, p6, p7}}, [{x_ptr}+{2 * WARP_COLUMNS * i + 16}];"]
        for j in range(8):  # bf16 pair j: column 2j in the low half, 2j + 1 in the high half
            lines += [f"shl.b32 xl{j}, p{j}, 16;", f"and.b32 xh{j}, p{j}, 0xffff0000;"]
        for r in range(rows):
            u = i * rows + r
            for wi in range(2):
                for b in range(8):  # nibble b of word wi -> v[8 wi + b]
                    index = f"w{2 * u + wi}"
                    if b:
                        lines.append(f"shr.b32 n{8 * wi + b}, {index}, {4 * b};")
                        index = f"n{8 * wi + b}"
                    lines.append(f"shfl.sync.idx.b32 v{8 * wi + b}, tbl, {index}, 0x1f, 0xffffffff;")
            # byte j of a word: its high nibble (b = 2j + 1) is column 2j, its low nibble column 2j + 1
            products = []
            for wi in range(2):
                for j in range(4):
                    high, low = f"v{8 * wi + 2 * j + 1}", f"v{8 * wi + 2 * j}"
                    products += [(high, f"xl{4 * wi + j}"), (low, f"xh{4 * wi + j}")]
            for j, (v, x) in enumerate(products):  # product j into chain j % chains
                acc = sums[j % chains]
                lines.append(f"mul.f32 {acc}, {v}, {x};" if j < chains else f"fma.rn.f32 {acc}, {v}, {x}, {acc};")
            lines += [f"add.f32 sum0, sum0, {acc};" for acc in sums[1:]]
            scale = f"s{u}"
            if not scale_f32:
                lines.append(f"cvt.f32.f16 sf, h{u};")
                scale = "sf"
            lines.append(f"fma.rn.f32 acc{r}, sum0, {scale}, acc{r};")
        lines.append("}")
    lines += [f"mov.b32 ${r}, acc{r};" for r in range(rows)]
    lines.append("}")
    return "\n".join(lines)


@triton.jit
def _row_pointers(words, scales, row, N, K: tl.constexpr, QBLOCK: tl.constexpr):
    """A lane's word and scale pointers in `row` (clamped: the store drops it), as int32 pointers for the asm."""
    r = tl.minimum(row, N - 1)
    I32: tl.constexpr = tl.pointer_type(tl.int32)
    return (words + r * (K // 8)).to(I32, bitcast=True), (scales + r * (K // QBLOCK)).to(I32, bitcast=True)


@triton.jit
def _gemv_nf4_ptx_kernel(
    x_ptr,  # [K] bf16, 16-byte aligned
    w_ptr,  # [N, K // 8] int32 words
    absmax_ptr,  # [N, K // QBLOCK] fp16 or fp32
    code_ptr,  # [16] fp32
    y_ptr,  # [N] bf16
    N,
    K: tl.constexpr,
    QBLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    WARPS: tl.constexpr,
    ASM: tl.constexpr,  # row_slice_ptx(K // WARPS, QBLOCK, ROWS, fp32 scales, chains)
):
    I32: tl.constexpr = tl.pointer_type(tl.int32)
    SLICE: tl.constexpr = K // WARPS
    t = tl.arange(0, 32 * WARPS)
    lane = t % 32
    col0 = (t // 32) * SLICE  # first column of this warp's slice
    x = x_ptr.to(I32, bitcast=True) + lane * 8 + col0 // 2
    code = (code_ptr + lane * 0).to(I32, bitcast=True)
    words = w_ptr + lane * 2 + col0 // 8
    scales = absmax_ptr + (lane * 16 + col0) // QBLOCK
    groups = tl.cdiv(N, ROWS)
    for g in tl.range(tl.program_id(0), groups, tl.num_programs(0)):
        row = g * ROWS + lane * 0
        w0, s0 = _row_pointers(words, scales, row, N, K, QBLOCK)
        if ROWS == 1:
            y0 = tl.inline_asm_elementwise(ASM, "=r,l,l,l,l", [x, code, w0, s0], dtype=tl.float32, is_pure=True,
                                           pack=1)
            tl.store(y_ptr + g, tl.sum(y0).to(y_ptr.dtype.element_ty))
        else:
            w1, s1 = _row_pointers(words, scales, row + 1, N, K, QBLOCK)
            y0, y1 = tl.inline_asm_elementwise(ASM, "=r,=r,l,l,l,l,l,l", [x, code, w0, s0, w1, s1],
                                               dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
            tl.store(y_ptr + g * 2, tl.sum(y0).to(y_ptr.dtype.element_ty))
            if g * 2 + 1 < N:
                tl.store(y_ptr + g * 2 + 1, tl.sum(y1).to(y_ptr.dtype.element_ty))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def gemv_nf4_ptx(x: torch.Tensor, words: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                 plan: Plan) -> torch.Tensor:
    """x [K] bf16 @ dequant(words [N, K/8] int32, absmax [N, K/blocksize], code [16]).T -> [N] bf16."""
    n, k = words.shape[0], 8 * words.shape[1]
    assert accepts(x, k, blocksize) and plan.fits(k) and x.shape == (k,)
    assert absmax.dtype in (torch.float16, torch.float32) and absmax.is_contiguous() and words.is_contiguous()
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    asm = row_slice_ptx(k // plan.warps, blocksize, plan.rows, absmax.dtype == torch.float32, plan.chains)
    programs = min(triton.cdiv(n, plan.rows), _sm_count(x.device.index or 0) * plan.per_sm)
    _gemv_nf4_ptx_kernel[(programs,)](x, words, absmax, code, y, n, k, QBLOCK=blocksize, ROWS=plan.rows,
                                      WARPS=plan.warps, ASM=asm, num_warps=plan.warps)
    return y
