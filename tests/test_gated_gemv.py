"""The GEMVs' gated form: an FFN's SiLU(gate(x)) * up(x) for one token in one launch (quant/kernels/gemv8.py,
gemv_nf4_ptx.py; dispatched by quant/base.py `silu_gated`).

On the GPU it must equal the three launches it replaces (the two GEMVs in the same kernel configuration, then
silu_mul) bit for bit, and the float reference within the quantized layers' tolerance, also replayed from a CUDA
graph; gate and up swapped must fail the reference (negative control). On the CPU, and for float or mismatched
layers, `silu_gated` declines and the FFN runs its layers as before.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant.base import error_stats, quantize_linear, silu_gated

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
FORMATS = ["fp8", "int8", "nf4"]


def _pair(fmt: str, n: int, k: int, device: str) -> list:
    if fmt == "nf4":
        pytest.importorskip("bitsandbytes")
    gen = torch.Generator().manual_seed(n + k)
    return [quantize_linear((torch.randn(n, k, generator=gen) * 0.02).bfloat16(), fmt).to(device) for _ in range(2)]


def _reference(gate, up, x: torch.Tensor) -> torch.Tensor:
    """fp32 SiLU(x W_gate^T) * (x W_up^T) from the dequantized weights, x [1, K]."""
    return F.silu(x.float() @ gate.dequantize().T) * (x.float() @ up.dequantize().T)


@pytest.mark.parametrize("fmt", FORMATS)
def test_declines_on_cpu_and_for_float_or_mixed_layers(fmt):
    gate, up = _pair(fmt, 64, 512, "cpu")
    x = torch.randn(1, 1, 512).bfloat16()
    assert silu_gated(gate, up, x) is None  # CPU: the layers' dequantize + matmul path
    assert silu_gated(nn.Linear(512, 64, bias=False), nn.Linear(512, 64, bias=False), x) is None
    other = "int8" if fmt != "int8" else "fp8"
    assert silu_gated(gate, _pair(other, 64, 512, "cpu")[0], x) is None


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n, k", [(9728, 2560), (130, 1024)], ids=str)
def test_layers_gated_match_the_reference_and_replay(fmt, n, k):
    gate, up = _pair(fmt, n, k, "cuda")
    x = torch.randn(1, 1, k, device="cuda").bfloat16()
    y = silu_gated(gate, up, x)  # the first call chooses the kernel configuration: before capture
    if y is None:
        assert fmt == "nf4", "the 8-bit kernels always have a gated form"
        pytest.skip("the first call's timing kept the three launches for this shape")
    assert y.shape == (1, 1, n) and y.dtype == torch.bfloat16
    ref = _reference(gate, up, x.view(1, k))
    assert error_stats(y.view(1, n), ref).ok()
    assert not error_stats(silu_gated(up, gate, x).view(1, n), ref).ok()
    prefill = torch.randn(1, 7, k, device="cuda").bfloat16()
    assert silu_gated(gate, up, prefill) is None  # several tokens: the layers' matmul path
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = silu_gated(gate, up, x)
    x.copy_(torch.randn_like(x))
    expected = silu_gated(gate, up, x)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("fp8_bits", [False, True], ids=["native", "bits"])
def test_gemv8_gated_is_the_three_launches_bit_for_bit(fmt, fp8_bits):
    from quant.kernels.gemv8 import gemv8
    from quant.kernels.swiglu import silu_mul
    from quant.kernels.tiles import TILES

    if fmt == "int8" and fp8_bits:
        pytest.skip("the bit decode is FP8's")
    if fmt == "fp8" and not fp8_bits and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no native FP8 conversion before sm_89")
    n, k = 1000, 2560
    gate, up = _pair(fmt, n, k, "cuda")
    x = torch.randn(k, device="cuda").bfloat16()
    for tile in TILES:
        fused = gemv8(x, gate.weight, gate.scale, fp8_bits=fp8_bits, tile=tile, up=(up.weight, up.scale))
        three = silu_mul(gemv8(x, gate.weight, gate.scale, fp8_bits=fp8_bits, tile=tile),
                         gemv8(x, up.weight, up.scale, fp8_bits=fp8_bits, tile=tile))
        assert torch.equal(fused, three), tile


@pytest.mark.cuda
@requires_cuda
def test_nf4_gated_is_the_three_launches_bit_for_bit():
    from quant.kernels import gemv_nf4_ptx
    from quant.kernels.swiglu import silu_mul

    n, k = 1000, 2560
    gate, up = _pair("nf4", n, k, "cuda")
    x = torch.randn(k, device="cuda").bfloat16()
    (words, absmax), (up_words, up_absmax) = [(p.view(torch.int32), a) for p, a in (gate._rows(), up._rows())]
    for plan in gemv_nf4_ptx.PLANS:
        if plan.rows != 2 or not plan.fits(k):
            continue
        fused = gemv_nf4_ptx.gemv_nf4_ptx(x, words, absmax, gate.code, gate.blocksize, plan, up=(up_words, up_absmax))
        three = silu_mul(gemv_nf4_ptx.gemv_nf4_ptx(x, words, absmax, gate.code, gate.blocksize, plan),
                         gemv_nf4_ptx.gemv_nf4_ptx(x, up_words, up_absmax, gate.code, gate.blocksize, plan))
        assert torch.equal(fused, three), plan


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_tiny_model_decode_step_runs_each_ffn_gated(tiny_checkpoint, monkeypatch, fmt):
    """The tiny model quantized on the GPU: a one-token step runs each slow layer's gate, up and SiLU x up as one
    gated launch (counted: no silu_mul), and its output matches the layers run one by one (the torch path)."""
    from quant.kernels import gemv8 as gemv8_module
    from quant.kernels import swiglu
    from runtime import model as model_module
    from runtime.loader import WeightFormats, load_model
    from test_model import frames_sequence

    model = load_model(tiny_checkpoint, torch.device("cuda"), torch.bfloat16, formats=WeightFormats(fmt, fmt)).model
    tokens = frames_sequence(model.config, 6, 3, seed=2)[0][None].cuda()
    model.setup_caches(64, torch.bfloat16, torch.device("cuda"))
    calls = {"gated": 0, "silu_mul": 0}

    def gemv8_counted(*args, _kernel=gemv8_module.gemv8, **kwargs):
        calls["gated"] += kwargs.get("up") is not None
        return _kernel(*args, **kwargs)

    def silu_mul_counted(*args, _kernel=swiglu.silu_mul):
        calls["silu_mul"] += 1
        return _kernel(*args)

    monkeypatch.setattr(gemv8_module, "gemv8", gemv8_counted)
    monkeypatch.setattr(swiglu, "silu_mul", silu_mul_counted)
    layers = model.config.slow.n_layer
    with torch.inference_mode():
        model.forward_slow(tokens, 0)  # the prompt: matmuls, then silu_mul per layer
        assert calls == {"gated": 0, "silu_mul": layers}
        step = tokens[..., -1:], torch.tensor([tokens.shape[-1]], device="cuda")
        gated = model.forward_slow(*step).float()
        assert calls == {"gated": layers, "silu_mul": layers}
        monkeypatch.setattr(model_module, "silu_gated", lambda *args: None)
        three = model.forward_slow(*step).float()
    assert calls == {"gated": layers, "silu_mul": 2 * layers}
    assert torch.equal(gated, three) or error_stats(gated, three).rel_fro < 1e-2


@pytest.mark.cuda
@requires_cuda
def test_nf4_layers_with_unlike_scales_run_as_three_launches():
    """A gate with fp32 block scales (outside fp16's range) beside an up with fp16 ones: no gated form, None."""
    pytest.importorskip("bitsandbytes")
    gen = torch.Generator().manual_seed(3)
    gate = quantize_linear(torch.randn(256, 512, generator=gen) * 1e-6, "nf4").cuda()
    up = quantize_linear((torch.randn(256, 512, generator=gen) * 0.02).bfloat16(), "nf4").cuda()
    assert gate.absmax.dtype == torch.float32 and up.absmax.dtype == torch.float16
    x = torch.randn(1, 1, 512, device="cuda").bfloat16()
    assert gate.gemv_applies(x) and silu_gated(gate, up, x) is None
