"""Build every Triton kernel of the runtime for the users' GPU architectures, on any machine (no GPU needed).

The kernels are timed on an H100 (sm_90), but users run RTX 30xx (sm_86), 40xx (sm_89) and 50xx (sm_120) cards.
Triton compiles per architecture at the first call, so a kernel that cannot be built for a consumer card would
only fail there. This compiles each kernel with the S2 Pro shapes (head_dim 128, 4 query heads per KV head,
dim 2560, top-k 30 over a 4 096-code row) for each architecture and prints one line per build: `ok` or
`cannot: <reason>`. The FP8 GEMV with the hardware conversion cannot be built below sm_89; the runtime decodes
FP8 bits there instead (quant/kernels `fp8_native`).

    python benchmarks/compile_targets.py --arch 86,89,120
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sass_count import compile_for, count  # noqa: E402

from quant.kernels.decode_attention import (BLOCK, CHUNK, GROUP_ROWS, _decode_attention_combine_kernel,  # noqa: E402
                                            _decode_attention_split_kernel)
from quant.kernels.dequant_nf4 import BLOCK as DEQUANT_BLOCK  # noqa: E402
from quant.kernels.dequant_nf4 import _dequant_nf4_kernel  # noqa: E402
from quant.kernels.norm_rope import _norm_rope_kernel, _rms_norm_kernel  # noqa: E402
from quant.kernels.sample import _sample_kernel  # noqa: E402
from quant.kernels.swiglu import BLOCK as SILU_BLOCK  # noqa: E402
from quant.kernels.swiglu import _silu_mul_kernel  # noqa: E402
from quant.kernels.tiles import Tile  # noqa: E402

HEAD_DIM, GROUP, DIM, TOP_K, CODES = 128, 4, 2560, 30, 4096


@dataclass(frozen=True)
class Build:
    """One kernel as the runtime launches it: argument types (Triton signature strings), constexprs, warps."""

    kernel: object
    signature: dict[str, str]
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4


def _typed(names: str, kind: str) -> dict[str, str]:
    return {name: kind for name in names.split()}


BUILDS = {
    "decode attention (split)": Build(
        _decode_attention_split_kernel,
        _typed("q_ptr k_ptr v_ptr", "*bf16") | {"pos_ptr": "*i64", "part_ptr": "*fp32", "capacity": "i32",
                                                 "scale": "fp32", "splits": "i32"}
        | _typed("GROUP D CHUNK BLOCK ROWS", "constexpr"),
        {"GROUP": GROUP, "D": HEAD_DIM, "CHUNK": CHUNK, "BLOCK": BLOCK, "ROWS": GROUP_ROWS}),
    "decode attention (combine)": Build(
        _decode_attention_combine_kernel,
        {"part_ptr": "*fp32", "o_ptr": "*bf16", "splits": "i32"} | _typed("GROUP D SPLITS", "constexpr"),
        {"GROUP": GROUP, "D": HEAD_DIM, "SPLITS": 32}, num_warps=1),
    "draw (top-k, top-p, temperature)": Build(
        _sample_kernel,
        {"logits_ptr": "*bf16", "noise_ptr": "*fp32", "value_ptr": "*fp32", "index_ptr": "*i32", "out_ptr": "*i64",
         "V": "i32", "row_stride": "i32", "top_p": "fp32", "temperature": "fp32"}
        | _typed("K BLOCK KP LOW_BIT", "constexpr"),
        {"K": TOP_K, "BLOCK": CODES, "KP": 32, "LOW_BIT": 16}, num_warps=8),
    "residual add + RMSNorm": Build(
        _rms_norm_kernel,
        _typed("x_ptr delta_ptr w_ptr sum_ptr y_ptr", "*bf16") | {"eps": "fp32"}
        | _typed("D BLOCK HAS_DELTA", "constexpr"),
        {"D": DIM, "BLOCK": 4096, "HAS_DELTA": True}),
    "QK-norm + RoPE + cache write": Build(
        _norm_rope_kernel,
        _typed("q_ptr k_ptr v_ptr qw_ptr kw_ptr table_ptr q_out_ptr k_cache_ptr v_cache_ptr", "*bf16")
        | {"slot_ptr": "*i64"}
        | _typed("q_heads kv_heads positions token_stride cache_head_stride first_slot", "i32") | {"eps": "fp32"}
        | _typed("HALF HAS_NORM SLOT_ON_DEVICE", "constexpr"),
        {"HALF": HEAD_DIM // 2, "HAS_NORM": True, "SLOT_ON_DEVICE": True}),
    "SiLU x up": Build(
        _silu_mul_kernel, _typed("gate_ptr up_ptr y_ptr", "*bf16") | {"width": "i32", "BLOCK": "constexpr"},
        {"BLOCK": SILU_BLOCK}),
    "NF4 dequantization (prefill)": Build(
        _dequant_nf4_kernel,
        {"packed_ptr": "*u8", "absmax_ptr": "*fp16", "code_ptr": "*fp32", "out_ptr": "*bf16", "n_bytes": "i32",
         "n_weights": "i32"} | _typed("QBLOCK BLOCK", "constexpr"),
        {"QBLOCK": 64, "BLOCK": DEQUANT_BLOCK}),
}

# GEMVs through benchmarks/sass_count.py (its signatures): name -> (format, K, tile, shuffle)
GEMVS = {
    "NF4 GEMV (Triton, shuffle lookup)": ("nf4", DIM, Tile(1, 256, 1), True),
    "NF4 GEMV (Triton, gather lookup)": ("nf4", DIM, Tile(2, 256, 4), False),
    "NF4 GEMV (PTX, K over 2 warps)": ("nf4-ptx", 4096, Tile(2, 0, 2), False),
    "INT8 GEMV": ("int8", DIM, Tile(2, 512, 1), False),
    "FP8 GEMV (hardware conversion)": ("fp8", DIM, Tile(2, 512, 1), False),
    "FP8 GEMV (bit decode)": ("fp8-bits", DIM, Tile(2, 512, 1), False),
    "bf16 GEMV": ("bf16", DIM, Tile(1, 512, 1), False),
}


def build(name: str, arch: int) -> str | None:
    """Compile one kernel for sm_<arch>: None if it builds, else why not (the exception's first line)."""
    try:
        if name in GEMVS:
            fmt, k, tile, shuffle = GEMVS[name]
            count(fmt, k, tile, arch, shuffle)
        else:
            b = BUILDS[name]
            compile_for(b.kernel, b.signature, b.constexprs, arch, b.num_warps)
    except Exception as error:  # noqa: BLE001 -- any failure to build is the answer
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return f"{type(error).__name__}: {lines[-1] if lines else ''}"  # Triton's own reason is its last line
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="86,89,120", help="compute capabilities as numbers, comma-separated")
    args = parser.parse_args()
    for arch in (int(a) for a in args.arch.split(",")):
        for name in [*BUILDS, *GEMVS]:
            reason = build(name, arch)
            print(f"sm_{arch}\t{name}\t{'ok' if reason is None else 'cannot: ' + reason}", flush=True)


if __name__ == "__main__":
    main()
