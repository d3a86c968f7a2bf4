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
`L1::evict_first` ones, ran 0-2 % faster on every S2 shape (benchmarks/results/nf4-gemv-experiments-*.md). The
order of the PTX moves ptxas as much: each row's units before the next row's (for 4096x2560 also the loads issued
row by row) ran 3-5 % faster on 6144x2560, 4096x2560 and 2560x9728, given a register cap that keeps the launch
to one wave where needed, and 10-40 % slower on the other shapes: a plan names its order, the chooser times it.
The multiply-adds stay on the FMA pipe: `mma.sync` in this same layout (15 % fewer instructions) ran 20 % slower, a
unit's four mma being one dependent chain where the FFMA form has 16 independent products per row. Nor did fewer
instructions help: a byte-to-f16x2 table in shared memory with packed f16 multiply-adds (a third fewer in the inner
loop) ran at best 3 % faster than this kernel on wo, within its run-to-run spread, and 5 % slower on 4096x2560;
past the arithmetic, wo's time is that of its memory traffic arriving in one wave (experiments page, section 12).
Programmatic dependent launch, with the weights loaded before `griddepcontrol.wait` so that they stream under the
previous kernel, gained nothing that stays correct: ptxas hoists the `.nc` x loads above the wait, which then read
the previous layer's x, and x loads it keeps below the wait made every chain slower (section 13). Nor do TMA
tile copies read faster than plain loads (their read floor is 7-9 % above, section 14), nor fewer bytes:
bitsandbytes' uint8 block scales read as stored ran no faster even without decoding them, and 17-22 % slower with
the lookup of their 256-entry map (section 15).

Layout (bitsandbytes' packed rows, read as int32 words; see gemv_nf4.py): each lane owns 16-column units
u = lane + 32 i of a row (one 8-byte load of two words, two 16-byte loads of bf16 x, one block scale) and keeps
one fp32 partial sum per row; the warp sums its lanes at the end. The unit loop is unrolled in PTX, generated per
(K, block size, rows, scale dtype), so every load has an immediate offset and no address arithmetic remains. The
NF4 value of a nibble is a `shfl.sync` from the lane holding code[lane % 16] (a shuffle reads only the low 5 bits
of its index, so `word >> 4i` needs no mask). With `warps` > 1 the warps of a program take equal slices of K for
the same rows (more, shorter work items for the N = 2 560 shapes), summed through shared memory by Triton.
The gated form pairs row g of the FFN's gate weight with row g of its up weight in one item and stores
SiLU(gate) * up (swiglu.py's arithmetic): one launch where the two GEMVs and the product took three.

CUDA only (inline PTX), bf16 x only, K a multiple of 512 per warp, block sizes dividing 512.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quant.kernels import FMA
from quant.kernels.swiglu import silu_times

UNIT = 16  # columns per lane and unit: two int32 words of packed nibbles
WARP_COLUMNS = 32 * UNIT  # columns one warp covers per unit step


@dataclass(frozen=True)
class Plan:
    """`rows` output rows per work item (1 or 2), `warps` per program splitting K, `per_sm` programs per SM,
    `chains`: independent fp32 sums a unit's 16 products are split over (1, 2 or 4); `rows_first`: the PTX computes
    each row's units before the next row's (else unit by unit, all rows); `loads_by_row`: it issues the weight loads
    row by row (else unit by unit); `max_registers`: maxnreg for ptxas (None: its own choice, which may be
    fewer registers than a cap would let it take)."""

    rows: int
    warps: int
    per_sm: int
    chains: int = 1
    rows_first: bool = False
    loads_by_row: bool = False
    max_registers: int | None = None

    def fits(self, k: int) -> bool:
        return k % (self.warps * WARP_COLUMNS) == 0


# The configurations that won an S2 shape in sweeps on an H100 (rows 1-4, 1-4 warps, 4-32 programs per SM, 1-4
# chains, the PTX orders, register caps): 9728x2560 at 20/SM; 2560x4096 with K split over 2 warps; 6144x2560 at
# 24/SM with 2 chains, rows first and maxnreg 80 (one wave; ptxas takes 80 registers without the cap too, but
# schedules 7 % slower); 4096x2560 at 16/SM with rows first and loads by row (ptxas takes 128 registers and issues
# most loads up front: 16 warps/SM, one wave); 2560x9728 at 10/SM, 2 chains, rows first, maxnreg 128 (ptxas then
# takes 117 registers; left to its own choice it takes 80 and runs 5 % slower). ptxas schedules each order
# differently and the winners differ by shape (10-40 % between them), so the chooser times them per shape.
PLANS: tuple[Plan, ...] = (
    Plan(2, 1, 20),
    Plan(2, 2, 16),
    Plan(2, 1, 24, chains=2, rows_first=True, max_registers=80),
    Plan(2, 1, 16, rows_first=True, loads_by_row=True),
    Plan(2, 1, 10, chains=2, rows_first=True, max_registers=128),
)


def accepts(x: torch.Tensor, k: int, blocksize: int) -> bool:
    """The kernel's preconditions beyond the plan: bf16 x on CUDA, 16-byte aligned; whole units per scale block."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and x.data_ptr() % 16 == 0 and k % WARP_COLUMNS == 0
            and WARP_COLUMNS % blocksize == 0 and blocksize % UNIT == 0)


@functools.cache
def row_slice_ptx(k: int, blocksize: int, rows: int, scale_f32: bool, chains: int = 1, rows_first: bool = False,
                  loads_by_row: bool = False) -> str:
    """PTX for one lane over a K-column slice of `rows` rows; a unit's products summed in `chains` chains, the
    loads and the arithmetic in the orders of Plan's `loads_by_row` and `rows_first`.

    Operands: $0..$rows-1 the fp32 partial sums (out); then x (this lane's first unit), the code table, and per row
    its packed words and scales (this lane's first unit).
    """
    units = k // WARP_COLUMNS
    scale_bytes = 4 if scale_f32 else 2
    x_ptr, code_ptr = f"${rows}", f"${rows + 1}"
    unit_major = [(i, r) for i in range(units) for r in range(rows)]
    row_major = [(i, r) for r in range(rows) for i in range(units)]
    lines = ["{", ".reg .u32 lane;", ".reg .u64 ta;", ".reg .b32 tbl;",
             ".reg .f32 " + ", ".join(f"acc{r}" for r in range(rows)) + ";",
             f".reg .b32 w<{2 * units * rows}>, s<{units * rows}>" + (f", p<{8 * units}>;" if rows_first else ";"),
             "mov.u32 lane, %laneid;", "and.b32 lane, lane, 15;", "mul.wide.u32 ta, lane, 4;",
             f"add.u64 ta, ta, {code_ptr};", "ld.global.nc.b32 tbl, [ta];"]
    if not scale_f32:
        lines.append(f".reg .b16 h<{units * rows}>;")
    lines += [f"mov.f32 acc{r}, 0f00000000;" for r in range(rows)]
    for i, r in row_major if loads_by_row else unit_major:  # every weight load first; ptxas moves some later
        u, words, scales = i * rows + r, f"${rows + 2 + 2 * r}", f"${rows + 3 + 2 * r}"
        lines.append(f"ld.global.lu.v2.b32 {{w{2 * u}, w{2 * u + 1}}}, [{words}+{8 * 32 * i}];")
        offset = WARP_COLUMNS * i // blocksize * scale_bytes
        lines.append(f"ld.global.nc.b32 s{u}, [{scales}+{offset}];" if scale_f32
                     else f"ld.global.nc.b16 h{u}, [{scales}+{offset}];")
    # Rows first, unit i's x stays in p[8i..8i+7] for its other rows. Unit by unit, each unit's block loads x into
    # registers of its own: ptxas schedules that form 5-14 % faster on 4096x2560 and 9728x2560 than x held in
    # registers of the whole slice (the same instructions otherwise).
    blocks = [[(i, r)] for i, r in row_major] if rows_first else [[(i, r) for r in range(rows)] for i in range(units)]
    sums = [f"sum{c}" for c in range(chains)]
    for block in blocks:
        i = block[0][0]
        p = [f"p{8 * i + j}" for j in range(8)] if rows_first else [f"p{j}" for j in range(8)]
        lines += ["{", ".reg .b32 " + ("" if rows_first else "p<8>, ") + "xl<8>, xh<8>, n<16>, v<16>, sf;",
                  f".reg .f32 {', '.join(sums)};"]
        if block[0][1] == 0:  # the unit's first row loads its 16 bf16 of x
            lines += [f"ld.global.nc.v4.b32 {{{', '.join(p[:4])}}}, [{x_ptr}+{2 * WARP_COLUMNS * i}];",
                      f"ld.global.nc.v4.b32 {{{', '.join(p[4:])}}}, [{x_ptr}+{2 * WARP_COLUMNS * i + 16}];"]
        for j in range(8):  # bf16 pair j: column 2j in the low half, 2j + 1 in the high half
            lines += [f"shl.b32 xl{j}, {p[j]}, 16;", f"and.b32 xh{j}, {p[j]}, 0xffff0000;"]
        for i, r in block:
            lines += _row_unit_ptx(i * rows + r, r, sums, scale_f32)
        lines.append("}")
    lines += [f"mov.b32 ${r}, acc{r};" for r in range(rows)]
    lines.append("}")
    return "\n".join(lines)


def _row_unit_ptx(u: int, r: int, sums: list[str], scale_f32: bool) -> list[str]:
    """Row r's part of a unit: 16 lookups from its words w[2u], w[2u + 1], their products with x (xl, xh) summed
    in the chains `sums`, scaled by s[u] (or h[u]) into acc[r]."""
    lines = []
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
        acc = sums[j % len(sums)]
        lines.append(f"mul.f32 {acc}, {v}, {x};" if j < len(sums) else f"fma.rn.f32 {acc}, {v}, {x}, {acc};")
    lines += [f"add.f32 sum0, sum0, {acc};" for acc in sums[1:]]
    scale = f"s{u}"
    if not scale_f32:
        lines.append(f"cvt.f32.f16 sf, h{u};")
        scale = "sf"
    lines.append(f"fma.rn.f32 acc{r}, sum0, {scale}, acc{r};")
    return lines


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
    up_ptr,  # GATED: the up weight's words, like w_ptr (otherwise w_ptr again, unread)
    up_absmax_ptr,  # GATED: its scales
    code_ptr,  # [16] fp32
    y_ptr,  # [N] bf16
    N,
    K: tl.constexpr,
    QBLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    WARPS: tl.constexpr,
    ASM: tl.constexpr,  # row_slice_ptx(K // WARPS, QBLOCK, ROWS, fp32 scales, the plan's chains and orders)
    GATED: tl.constexpr,  # ROWS == 2: item g is row g of the gate and of the up weight; y[g] = SiLU(gate) * up
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
    groups = N if GATED else tl.cdiv(N, ROWS)
    for g in tl.range(tl.program_id(0), groups, tl.num_programs(0)):
        row = g * ROWS + lane * 0
        if ROWS == 1:
            w0, s0 = _row_pointers(words, scales, row, N, K, QBLOCK)
            y0 = tl.inline_asm_elementwise(ASM, "=r,l,l,l,l", [x, code, w0, s0], dtype=tl.float32, is_pure=True,
                                           pack=1)
            tl.store(y_ptr + g, tl.sum(y0).to(y_ptr.dtype.element_ty))
        else:
            if GATED:
                w0, s0 = _row_pointers(words, scales, g + lane * 0, N, K, QBLOCK)
                w1, s1 = _row_pointers(up_ptr + lane * 2 + col0 // 8, up_absmax_ptr + (lane * 16 + col0) // QBLOCK,
                                       g + lane * 0, N, K, QBLOCK)
            else:
                w0, s0 = _row_pointers(words, scales, row, N, K, QBLOCK)
                w1, s1 = _row_pointers(words, scales, row + 1, N, K, QBLOCK)
            y0, y1 = tl.inline_asm_elementwise(ASM, "=r,=r,l,l,l,l,l,l", [x, code, w0, s0, w1, s1],
                                               dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
            if GATED:
                tl.store(y_ptr + g, silu_times(tl.sum(y0), tl.sum(y1), y_ptr.dtype.element_ty))
            else:
                tl.store(y_ptr + g * 2, tl.sum(y0).to(y_ptr.dtype.element_ty))
                if g * 2 + 1 < N:
                    tl.store(y_ptr + g * 2 + 1, tl.sum(y1).to(y_ptr.dtype.element_ty))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def gemv_nf4_ptx(x: torch.Tensor, words: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                 plan: Plan, up: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [K] bf16 @ dequant(words [N, K/8] int32, absmax [N, K/blocksize], code [16]).T -> [N] bf16; with `up` =
    (words, absmax) of a second weight of the same shape (and code), SiLU(that) * (x @ dequant(up).T) instead.
    The gated form needs a plan of 2 rows: an item's two rows are the gate's row and the up weight's."""
    n, k = words.shape[0], 8 * words.shape[1]
    assert accepts(x, k, blocksize) and plan.fits(k) and x.shape == (k,)
    assert absmax.dtype in (torch.float16, torch.float32) and absmax.is_contiguous() and words.is_contiguous()
    up_words, up_absmax = up if up is not None else (words, absmax)
    assert up_words.shape == words.shape and up_absmax.shape == absmax.shape and up_absmax.dtype == absmax.dtype
    assert up_words.is_contiguous() and up_absmax.is_contiguous() and (up is None or plan.rows == 2)
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    asm = row_slice_ptx(k // plan.warps, blocksize, plan.rows, absmax.dtype == torch.float32, plan.chains,
                        plan.rows_first, plan.loads_by_row)
    items = n if up is not None else triton.cdiv(n, plan.rows)
    programs = min(items, _sm_count(x.device.index or 0) * plan.per_sm)
    cap = {"maxnreg": plan.max_registers} if plan.max_registers else {}
    _gemv_nf4_ptx_kernel[(programs,)](x, words, absmax, up_words, up_absmax, code, y, n, k, QBLOCK=blocksize,
                                      ROWS=plan.rows, WARPS=plan.warps, ASM=asm, GATED=up is not None,
                                      num_warps=plan.warps, **cap, **FMA)
    return y
