"""SiLU(gate) x up in one launch, where torch takes two (the SiLU, then the product): 76 launches per decode frame.
The GEMV kernels apply the same `silu_times` to a gate row and an up row computed in one launch (their gated form).

Same arithmetic as `F.silu(gate) * up` on a GPU: x / (1 + exp(-x)) in fp32 with an accurate exp and a correctly
rounded division, rounded to the activation dtype, then the product in fp32 rounded once more; so the results
are torch's bit for bit (tests/test_swiglu.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from quant.kernels import FMA

BLOCK = 1024


@triton.jit
def silu_times(gate, up, DTYPE: tl.constexpr):
    """SiLU(gate) * up with gate and up first rounded to DTYPE (as the layers' outputs are), in DTYPE."""
    g = gate.to(DTYPE).to(tl.float32)
    silu = tl.math.div_rn(g, 1.0 + libdevice.exp(-g)).to(DTYPE)
    return (silu.to(tl.float32) * up.to(DTYPE).to(tl.float32)).to(DTYPE)


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, y_ptr, width, BLOCK: tl.constexpr):
    """Program (row, block): BLOCK columns of one row. The row's width is the layer's (specialized: divisible by 16
    gives vector loads); the number of rows, the prompt's length, is in no argument, so that one compiled variant
    serves every prompt and can compile before the first (runtime/stand_in_frame.py)."""
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = i < width
    at = tl.program_id(0).to(tl.int64) * width + i
    gate = tl.load(gate_ptr + at, mask=inside, other=0.0)
    up = tl.load(up_ptr + at, mask=inside, other=0.0)
    tl.store(y_ptr + at, silu_times(gate, up, y_ptr.dtype.element_ty), mask=inside)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: same shape and dtype -> SiLU(gate) * up, contiguous."""
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    width = gate.shape[-1]
    _silu_mul_kernel[(gate.numel() // width, triton.cdiv(width, BLOCK))](gate, up, y, width, BLOCK=BLOCK, **FMA)
    return y
