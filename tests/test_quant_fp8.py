"""FP8: the community s2-pro-fp8 rule reproduced bit for bit, and its tensors loaded as they are."""

from __future__ import annotations

import pytest
import torch

from quant.base import load_linear, quantize_linear
from quant.fp8 import FP8Linear
from runtime.errors import CheckpointError


def community_rule(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s2-pro-fp8's conversion: scale = row absmax / 448 (fp32 [out, 1]); weight = (w / scale) cast to e4m3fn."""
    scale = w.abs().amax(dim=1, keepdim=True).float() / 448.0
    return (w / scale).to(torch.float8_e4m3fn), scale


def _weight(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(out_f, in_f, generator=gen) * 0.02).bfloat16()


def test_bit_exact_with_community_rule():
    weight = _weight(6144, 2560)  # the wqkv shape
    codes, scale = community_rule(weight)
    stored = quantize_linear(weight, "fp8").stored_tensors()
    assert stored["weight"].dtype == torch.float8_e4m3fn and stored["weight.scale"].shape == (6144, 1)
    assert torch.equal(stored["weight"].view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(stored["weight.scale"], scale)


def test_bit_check_detects_one_changed_code():
    """Negative control for the comparison above."""
    codes, _ = community_rule(_weight(8, 64))
    ours = quantize_linear(_weight(8, 64), "fp8").stored_tensors()["weight"].view(torch.uint8).clone()
    ours[3, 5] += 1
    assert not torch.equal(ours, codes.view(torch.uint8))


def test_row_max_maps_to_448():
    weight = _weight(16, 256)
    layer = quantize_linear(weight, "fp8")
    assert (layer.weight.float().abs().amax(dim=1) == 448).all()


def test_zero_rows_are_exact_zeros():
    weight = _weight(8, 64)
    weight[2] = 0
    layer = quantize_linear(weight, "fp8")
    assert layer.scale[2, 0] == 0
    assert not layer.weight.float().isnan().any()
    assert (layer.dequantize()[2] == 0).all() and torch.isfinite(layer(torch.randn(3, 64))).all()


def test_non_finite_weight_is_reported():
    weight = _weight(8, 64)
    weight[1, 1] = float("inf")
    with pytest.raises(CheckpointError, match="inf or NaN"):
        quantize_linear(weight, "fp8")


def test_loads_community_tensors_unchanged():
    """A layer of the s2-pro-fp8 file: `<name>` float8_e4m3fn and `<name>.scale` float32 [out, 1]."""
    codes, scale = community_rule(_weight(256, 128))
    layer = load_linear("fp8", {"weight": codes, "weight.scale": scale})
    assert torch.equal(layer.dequantize(), codes.float() * scale)
    again = load_linear("fp8", layer.stored_tensors())
    assert torch.equal(again.weight.view(torch.uint8), codes.view(torch.uint8))


def test_rejects_wrong_layout():
    codes, scale = community_rule(_weight(16, 32))
    with pytest.raises(CheckpointError, match="expected torch.float8_e4m3fn"):
        FP8Linear.from_stored({"weight": codes.float(), "weight.scale": scale})
    with pytest.raises(CheckpointError, match=r"\[out, 1\]"):
        FP8Linear.from_stored({"weight": codes, "weight.scale": scale.flatten()})
    with pytest.raises(CheckpointError, match="missing"):
        FP8Linear.from_stored({"weight": codes})
