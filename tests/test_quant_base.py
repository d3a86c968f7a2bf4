"""The shared interface: registry, drop-in behaviour, swapping linears in a model, the Tier-0 metric."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quant.base import (FORMATS, QuantizedLinear, error_stats, format_class, load_linear, quantize_linear,
                        reference_output, swap_linears)
from runtime.errors import InputError


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_registered_formats_are_drop_in_linears(fmt):
    weight = torch.randn(96, 128) * 0.02
    layer = quantize_linear(weight, fmt)
    assert isinstance(layer, format_class(fmt)) and isinstance(layer, QuantizedLinear) and layer.format == fmt
    assert (layer.out_features, layer.in_features) == (96, 128)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, 128, dtype=dtype)
        y = layer(x)
        assert y.shape == (2, 3, 96) and y.dtype == dtype
    assert not layer.gemv_applies(torch.randn(128))  # CPU: dequantize + matmul
    stored = layer.stored_tensors()
    assert all(isinstance(t, torch.Tensor) for t in stored.values()) and "weight" in stored
    assert torch.equal(load_linear(fmt, stored).dequantize(), layer.dequantize())


def test_unknown_format_is_a_clear_error():
    with pytest.raises(InputError, match="nf4, fp8, int8"):
        quantize_linear(torch.randn(4, 64), "int3")


def test_swap_linears_replaces_only_chosen_layers():
    model = nn.Sequential(nn.Linear(64, 128, bias=False), nn.ReLU(), nn.Linear(128, 64, bias=False))
    x = torch.randn(5, 64)
    before = model(x)
    swapped = swap_linears(model, lambda name, linear: "int8" if name == "0" else None)
    assert swapped == ["0"]
    assert model[0].format == "int8" and isinstance(model[2], nn.Linear)
    assert error_stats(model(x), before).ok(max_rel=2e-2, min_cos=0.999)


def test_swap_linears_refuses_biases():
    with pytest.raises(InputError, match="bias"):
        swap_linears(nn.Sequential(nn.Linear(64, 64)), lambda name, linear: "fp8")


def test_error_stats_pass_and_fail():
    layer = quantize_linear(torch.randn(64, 128) * 0.02, "fp8")
    x = torch.randn(4, 128)
    ref = reference_output(x, layer)
    assert error_stats(layer(x), ref).ok()
    assert not error_stats(layer(x) * 1.02, ref).ok()  # a 2 % scale error fails the 1 % gate
    assert not error_stats(layer(x).flip(-1), ref).ok()
