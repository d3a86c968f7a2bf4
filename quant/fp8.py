"""FP8 e4m3 weight-only linears with one fp32 scale per output row: the community s2-pro-fp8 layout.

Rule (the s2-pro-fp8 conversion's, reproduced bit for bit): scale = row absmax / 448 (float32, [out, 1]) and
weight = (w / scale).to(torch.float8_e4m3fn), stored as `weight` + `weight.scale`, the tensor names that
checkpoint uses, so its files load with `from_stored` unchanged. 448 is e4m3fn's largest finite value.
Decode runs our Triton GEMV: the hardware conversion on sm_89+, a bit-level decode on sm_86 (RTX 30xx).
"""

from __future__ import annotations

import torch
from torch import Tensor

from quant.base import RowScaledLinear


class FP8Linear(RowScaledLinear):
    format = "fp8"
    element_dtype = torch.float8_e4m3fn
    qmax = 448.0

    @staticmethod
    def _encode(scaled: Tensor) -> Tensor:
        return scaled.to(torch.float8_e4m3fn)  # round to nearest even, as the community conversion did
