"""NF4 weight -> float, for the multi-token forward (prefill) on the GPU: bitsandbytes' dequantize_4bit, bit for bit.

Why ours: the prefill is a model's only use of the dequantized weight once the weights come from the pre-quantized
store, and importing bitsandbytes for it cost each NF4 run about 2 s (it pulls in sympy and torch._dynamo;
benchmarks/results/cli-wall-*.md). The arithmetic is the same: code[nibble] * block scale in fp32, rounded once.

Layout: bitsandbytes' packed bytes, byte i holding weights 2i (high nibble) and 2i + 1 (low nibble) of the
row-major weight; a block of `blocksize` (even) weights shares one scale, so a byte's two weights do too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # bytes per program


# The counts are not specialized: one compiled variant serves every layer's shape and can compile before the first
# prefill (runtime/compile_ahead.py); as fast as specialized ones on S2's shapes (H100: 0.091-0.140 ms either way
# for 4 layers, benchmarks/results/first-run-*.md).
@triton.jit(do_not_specialize=["n_bytes", "n_weights"])
def _dequant_nf4_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n_bytes, n_weights, QBLOCK: tl.constexpr,
                        BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n_bytes
    byte = tl.load(packed_ptr + i, mask=inside, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + (2 * i) // QBLOCK, mask=inside, other=0.0).to(tl.float32)
    high = tl.load(code_ptr + (byte >> 4)) * scale
    low = tl.load(code_ptr + (byte & 15)) * scale
    dtype = out_ptr.dtype.element_ty  # rounded to nearest even, as torch and bitsandbytes' GPU kernel round
    tl.store(out_ptr + 2 * i, high.to(dtype, fp_downcast_rounding="rtne"), mask=inside)
    tl.store(out_ptr + 2 * i + 1, low.to(dtype, fp_downcast_rounding="rtne"), mask=inside & (2 * i + 1 < n_weights))


def dequant_nf4(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, shape: torch.Size,
                dtype: torch.dtype) -> torch.Tensor:
    """packed [ceil(N*K/2)] uint8, absmax [ceil(N*K/blocksize)] fp16/fp32, code [16] fp32 -> weight `shape` in
    `dtype`, on their (CUDA) device."""
    n_weights = shape.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == (n_weights + 1) // 2 and blocksize % 2 == 0
    assert code.dtype == torch.float32 and code.numel() == 16
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n_bytes = packed.numel()
    _dequant_nf4_kernel[(triton.cdiv(n_bytes, BLOCK),)](packed.reshape(-1), absmax.reshape(-1), code, out, n_bytes,
                                                       n_weights, QBLOCK=blocksize, BLOCK=BLOCK)
    return out
