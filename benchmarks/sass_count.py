"""Count the machine instructions of our GEMV kernels, compiled for a GPU architecture, on any machine.

The batch-1 GEMVs are bound by instruction issue more than by DRAM bandwidth, so the SASS count per weight is a
useful number before a GPU is at hand. Triton's wheel carries ptxas and nvdisasm: this compiles a kernel for
sm_XX with the same specializations a launch gets (16-byte aligned pointers, N divisible by 16) and prints the
instruction histogram of one program and the thread-instructions per weight.

    python benchmarks/sass_count.py nf4 --k 2560 --tile 1,256,1 --shuffle
    python benchmarks/sass_count.py nf4-ptx --k 2560 --tile 2,1,1    # PTX kernel: rows, FMA chains, warps
    python benchmarks/sass_count.py nf4-ptx --k 2560 --tile 2,2,1 --rows-first --max-registers 80
    python benchmarks/sass_count.py fp8 --k 9728 --tile 2,512,1 --arch 89
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from quant.kernels import FMA  # noqa: E402
from quant.kernels.gemv8 import _gemv8_kernel  # noqa: E402
from quant.kernels.gemv_nf4 import _gemv_nf4_kernel  # noqa: E402
from quant.kernels.gemv_nf4_ptx import _gemv_nf4_ptx_kernel, row_slice_ptx  # noqa: E402
from quant.kernels.tiles import Tile  # noqa: E402

_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


@dataclass
class SassCount:
    opcodes: collections.Counter  # opcode (without modifiers) -> count in one program
    weights_per_thread: float

    @property
    def total(self) -> int:
        return sum(self.opcodes.values())

    @property
    def per_weight(self) -> float:
        """Instructions each thread issues per weight it handles."""
        return self.total / self.weights_per_thread


def nvdisasm() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"


def compile_for(kernel, signature: dict[str, str], constexprs: dict, arch: int, num_warps: int,
                max_registers: int | None = None, aligned: tuple[str, ...] = ()):
    """Compile a Triton kernel for sm_<arch> without a GPU, with the runtime's launch options and specialised as a
    launch would be: every pointer (and the integer arguments named in `aligned`) divisible by 16. Returns Triton's
    compiled kernel (asm by stage)."""
    divisible = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(signature.items())
                 if kind.startswith("*") or name in aligned}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=divisible)
    options = {"num_warps": num_warps} | FMA | ({"maxnreg": max_registers} if max_registers else {})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def count(fmt: str, k: int, tile: Tile, arch: int = 90, shuffle: bool = False, qblock: int = 64,
          rows_first: bool = False, loads_by_row: bool = False, max_registers: int | None = None) -> SassCount:
    """Compile one kernel configuration for sm_<arch> and count its SASS instructions (nf4-ptx: in the PTX orders
    and under the register cap of gemv_nf4_ptx.Plan)."""
    if fmt == "nf4":
        kernel = _gemv_nf4_kernel
        signature = {"x_ptr": "*bf16", "w_ptr": "*i32", "absmax_ptr": "*fp16", "code_ptr": "*fp32", "y_ptr": "*bf16",
                     "N": "i32", "K": "constexpr", "QBLOCK": "constexpr", "BLOCK_N": "constexpr",
                     "BLOCK_K": "constexpr", "SHUFFLE": "constexpr"}
        constexprs = {"K": k, "QBLOCK": qblock, "SHUFFLE": shuffle}
    elif fmt == "nf4-ptx":  # tile.block_n rows per work item, tile.block_k FMA chains, K over tile.num_warps warps
        kernel = _gemv_nf4_ptx_kernel
        signature = {"x_ptr": "*bf16", "w_ptr": "*i32", "absmax_ptr": "*fp16", "up_ptr": "*i32",
                     "up_absmax_ptr": "*fp16", "code_ptr": "*fp32", "y_ptr": "*bf16", "N": "i32", "K": "constexpr",
                     "QBLOCK": "constexpr", "ROWS": "constexpr", "WARPS": "constexpr", "ASM": "constexpr",
                     "GATED": "constexpr"}
        constexprs = {"K": k, "QBLOCK": qblock, "ROWS": tile.block_n, "WARPS": tile.num_warps, "GATED": False,
                      "ASM": row_slice_ptx(k // tile.num_warps, qblock, tile.block_n, False, max(tile.block_k, 1),
                                           rows_first, loads_by_row)}
    else:
        kernel = _gemv8_kernel
        weight = {"fp8": "*fp8e4nv", "int8": "*i8", "fp8-bits": "*u8", "bf16": "*bf16"}[fmt]
        scale = weight if fmt == "bf16" else "*fp32"  # float weights have no scales: the weight passed again, unread
        signature = {"x_ptr": "*bf16", "w_ptr": weight, "scale_ptr": scale, "up_ptr": weight, "up_scale_ptr": scale,
                     "y_ptr": "*bf16", "N": "i32", "K": "constexpr", "FP8_BITS": "constexpr", "SCALED": "constexpr",
                     "GATED": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
        constexprs = {"K": k, "FP8_BITS": fmt == "fp8-bits", "SCALED": fmt != "bf16", "GATED": False}
    if fmt != "nf4-ptx":
        constexprs |= {"BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k}
    compiled = compile_for(kernel, signature, constexprs, arch, tile.num_warps, max_registers, aligned=("N",))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([str(nvdisasm()), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    opcodes = collections.Counter(_OPCODE.findall(sass))
    threads = 32 * tile.num_warps
    return SassCount(opcodes, tile.block_n * k / threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("format", choices=["nf4", "nf4-ptx", "fp8", "int8", "fp8-bits", "bf16"])
    parser.add_argument("--k", type=int, default=2560, help="input features (compiled in: the K loop is unrolled)")
    parser.add_argument("--tile", default="1,256,1", help="BLOCK_N,BLOCK_K,num_warps (nf4-ptx: rows,chains,warps)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability as a number: 80, 86, 89, 90")
    parser.add_argument("--shuffle", action="store_true", help="NF4: the shfl.sync lookup instead of the gather")
    parser.add_argument("--rows-first", action="store_true", help="nf4-ptx: each row's units before the next row's")
    parser.add_argument("--loads-by-row", action="store_true", help="nf4-ptx: the weight loads issued row by row")
    parser.add_argument("--max-registers", type=int, help="a register cap for ptxas (maxnreg)")
    args = parser.parse_args()
    tile = Tile(*(int(v) for v in args.tile.split(",")))
    result = count(args.format, args.k, tile, args.arch, args.shuffle, rows_first=args.rows_first,
                   loads_by_row=args.loads_by_row, max_registers=args.max_registers)
    print(f"{args.format} K={args.k} tile={args.tile} sm_{args.arch}{' shuffle' if args.shuffle else ''}: "
          f"{result.total} instructions per program, {result.per_weight:.2f} per weight per thread")
    print(", ".join(f"{op} {n}" for op, n in result.opcodes.most_common(16)))


if __name__ == "__main__":
    main()
