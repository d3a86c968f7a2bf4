"""INT8: symmetric per-row codes with scale = row absmax / 127."""

from __future__ import annotations

import pytest
import torch

from quant.base import load_linear, quantize_linear
from runtime.errors import CheckpointError


def _weight(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(out_f, in_f, generator=gen) * 0.02).bfloat16()


def test_codes_follow_the_documented_rule():
    weight = _weight(2560, 4096)
    scale = weight.abs().amax(dim=1, keepdim=True).float() / 127.0
    expected = torch.round(weight.float() / scale).to(torch.int8)
    layer = quantize_linear(weight, "int8")
    assert torch.equal(layer.scale, scale) and torch.equal(layer.weight, expected)
    assert layer.weight.min() >= -127 and (layer.weight.abs().amax(dim=1) == 127).all()


def test_rounding_error_is_at_most_half_a_step():
    weight = _weight(64, 512)
    layer = quantize_linear(weight, "int8")
    err = (layer.dequantize() - weight.float()).abs()
    assert (err <= layer.scale * (0.5 + 1e-4)).all()  # + fp32 rounding of code * scale
    assert not (err <= layer.scale * 0.25).all()  # negative control: a tighter bound is violated


def test_zero_rows_and_round_trip():
    weight = _weight(8, 64)
    weight[5] = 0
    layer = quantize_linear(weight, "int8")
    assert layer.scale[5, 0] == 0 and (layer.weight[5] == 0).all()
    again = load_linear("int8", layer.stored_tensors())
    assert torch.equal(again.weight, layer.weight) and torch.equal(again.scale, layer.scale)


def test_rejects_fp8_tensors_as_int8():
    layer = quantize_linear(_weight(8, 64), "fp8")
    with pytest.raises(CheckpointError, match="expected torch.int8"):
        load_linear("int8", layer.stored_tensors())
