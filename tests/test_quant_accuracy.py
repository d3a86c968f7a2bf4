"""Tier 0 (quality-protocol.md): every quantized linear against its format's reference dequantization.

The reference is computed independently of the layer's own compute path: bitsandbytes' double-quantized
dequantization for NF4, `weight.float() * scale` for the per-row formats. Each S2 shape is covered by one format
(real shapes on the CPU cost seconds, so they are spread across formats), at 1, 7 and 64 tokens.
"""

from __future__ import annotations

import pytest
import torch

from quant.base import ErrorStats, QuantizedLinear, error_stats, quantize_linear

TOKENS = (1, 7, 64)
# (format, out, in): wqkv, w2 (tall K), wo, the 4 097-row slow head, w1/w3, fast_output.
CASES = [
    ("nf4", 6144, 2560),
    ("nf4", 2560, 9728),
    ("fp8", 2560, 4096),
    ("fp8", 4097, 2560),
    ("int8", 9728, 2560),
    ("int8", 4096, 2560),
]


def reference_weight(layer: QuantizedLinear) -> torch.Tensor:
    """The format's own definition of the float weight, from the stored tensors alone."""
    stored = layer.stored_tensors()
    if layer.format == "nf4":
        import bitsandbytes.functional as bnbf

        state = bnbf.QuantState.from_dict(
            {k.removeprefix("weight."): v for k, v in stored.items() if k != "weight"}, device=torch.device("cpu")
        )
        state.dtype = torch.float32  # dequantize in fp32, not rounded to the source weight's bf16
        return bnbf.dequantize_4bit(stored["weight"], state)
    return stored["weight"].float() * stored["weight.scale"]


def check(layer: QuantizedLinear, x: torch.Tensor, ref_w: torch.Tensor) -> ErrorStats:
    return error_stats(layer(x), x.float() @ ref_w.T)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}")
def case(request):
    fmt, out_f, in_f = request.param
    gen = torch.Generator().manual_seed(out_f + in_f)
    weight = (torch.randn(out_f, in_f, generator=gen) * 0.02).bfloat16()
    layer = quantize_linear(weight, fmt)
    return layer, reference_weight(layer), gen


@pytest.mark.parametrize("tokens", TOKENS)
def test_layer_matches_reference(case, tokens):
    layer, ref_w, gen = case
    x = torch.randn(tokens, layer.in_features, generator=gen).bfloat16()
    y = layer(x)
    assert y.shape == (tokens, layer.out_features) and y.dtype == torch.bfloat16
    stats = check(layer, x, ref_w)
    assert stats.ok(), stats


def test_misaligned_scales_fail(case):
    """Negative control: the same check on a layer whose scales are shifted by one row/block must fail."""
    layer, ref_w, gen = case
    x = torch.randn(7, layer.in_features, generator=gen).bfloat16()
    scales = layer.absmax if layer.format == "nf4" else layer.scale
    original = scales.clone()
    try:
        scales.copy_(scales.roll(1, 0))
        stats = check(layer, x, ref_w)
    finally:
        scales.copy_(original)
    assert not stats.ok(), stats
