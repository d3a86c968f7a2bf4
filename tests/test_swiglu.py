"""SiLU(gate) x up in one kernel (quant/kernels/swiglu.py) against torch's two, on a GPU: bit for bit at the FFN
shapes, with a negative control (the operands swapped) so that the comparison can fail."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]


@pytest.mark.parametrize("shape", [(1, 1, 9728), (1, 7, 9728), (3, 1000)], ids=str)
def test_silu_mul_is_torchs_bit_for_bit(shape):
    from quant.kernels.swiglu import silu_mul

    gen = torch.Generator("cuda").manual_seed(0)
    gate, up = ((torch.randn(shape, generator=gen, device="cuda") * 4).bfloat16() for _ in range(2))
    y = silu_mul(gate, up)
    assert y.shape == gate.shape and y.dtype == torch.bfloat16
    assert torch.equal(y, F.silu(gate) * up)
    assert not torch.equal(silu_mul(up, gate), F.silu(gate) * up)


def test_silu_mul_takes_strided_operands():
    from quant.kernels.swiglu import silu_mul

    both = torch.randn(2, 9728, device="cuda").bfloat16()
    gate, up = both[:, ::2], both[:, 1::2]
    assert torch.equal(silu_mul(gate, up), F.silu(gate) * up)
