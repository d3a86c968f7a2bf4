"""Our batch-1 GEMV on bf16 / fp16 weights (quant/kernels/gemv8.py `gemv_float`) and the layer that dispatches to it
(quant/base.py `FloatLinear`): against the fp32 product, gated and plain, chosen against cuBLAS on the first call,
replayed in a CUDA graph. Without CUDA the kernel runs in Triton's interpreter with fixed tiles (conftest.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_graph_replays_eager
from quant.base import FloatLinear, error_stats, silu_gated

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _weights(n: int, k: int, dtype: torch.dtype, count: int = 1, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, k, generator=gen) * 0.02).to(dtype).to(DEVICE) for _ in range(count)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n, k", [(37, 320), (130, 1088), (4097, 2560)], ids=str)
def test_kernel_matches_the_fp32_product(dtype, n, k):
    pytest.importorskip("triton")
    from quant.kernels.gemv8 import gemv_float
    from quant.kernels.tiles import Tile

    (weight,) = _weights(n, k, dtype)
    x = torch.randn(k, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    y = gemv_float(x, weight, tile=Tile(4, 256, 1) if CUDA else Tile(16, 512, 1))
    assert y.dtype == dtype and y.shape == (n,)
    assert error_stats(y, x.float() @ weight.float().T).ok()
    assert not error_stats(y, x.float() @ weight.float().T * 1.03).ok()  # negative control: a 3 % scale error


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n, k", [(130, 1088), (9728, 2560)], ids=str)
def test_gated_kernel_matches_the_fp32_reference(dtype, n, k):
    """(SiLU's exp has no CPU interpreter form: GPU only.)"""
    from quant.kernels.gemv8 import gemv_float
    from quant.kernels.tiles import TILES

    gate, up = _weights(n, k, dtype, 2)
    x = torch.randn(k, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    reference = F.silu(x.float() @ gate.float().T) * (x.float() @ up.float().T)
    for tile in TILES:
        assert error_stats(gemv_float(x, gate, up=up, tile=tile), reference).ok()
    assert error_stats(gemv_float(x, gate, up=up), reference).ok()  # the chosen one, ours or cuBLAS
    assert not error_stats(gemv_float(x, up, up=gate, tile=TILES[0]), reference).ok()  # gate and up exchanged


def test_the_first_call_times_cublas_beside_the_tiles_and_may_keep_it(monkeypatch):
    pytest.importorskip("triton")
    from quant.kernels import gemv8 as gemv8_module
    from quant.kernels.tiles import TILES

    offered = []

    def choose_cublas(tensors, candidates, run, key):
        offered.append(list(candidates))
        return None

    monkeypatch.setattr(gemv8_module, "fastest", choose_cublas)
    monkeypatch.setattr(gemv8_module, "_tiles", {})
    (weight,) = _weights(24, 64, torch.bfloat16)
    x = torch.randn(64).bfloat16().to(DEVICE)
    y = gemv8_module.gemv_float(x, weight)
    assert offered == [[None, *TILES]] and torch.equal(y, F.linear(x, weight))
    assert gemv8_module.chosen_tiles() == {(24, 64, torch.bfloat16, False, False, torch.bfloat16, DEVICE): "cuBLAS"}
    gemv8_module.gemv_float(x, weight)
    assert len(offered) == 1  # chosen once per shape


def test_float_linear_is_nn_linear_off_the_kernel_path():
    layer = FloatLinear(64, 24, bias=False)
    plain = nn.Linear(64, 24, bias=False)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(1, 1, 64)
    assert isinstance(layer, nn.Linear) and not layer.gemv_applies(x)  # CPU, fp32
    assert torch.equal(layer(x), plain(x))
    assert silu_gated(layer, FloatLinear(64, 24, bias=False), x) is None  # the FFN runs its layers


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("n, k", [(6144, 2560), (2560, 4096), (9728, 2560), (4097, 2560)], ids=str)
def test_float_linear_dispatch_choice_and_graph_replay(n, k):
    from quant.kernels.gemv8 import chosen_tiles

    layer = FloatLinear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
    assert layer.gemv_applies(x) and not layer.gemv_applies(x.float())
    eager = layer(x)  # the first call chooses (ours or cuBLAS): before capture
    assert (n, k, torch.bfloat16, False, False, torch.bfloat16, x.device) in chosen_tiles()
    assert eager.shape == (1, 1, n) and error_stats(eager, x.float().reshape(1, k) @ layer.weight.float().T).ok()
    assert_graph_replays_eager(layer, x)
    prefill = torch.randn(7, k, device="cuda", dtype=torch.bfloat16)  # more tokens: cuBLAS
    assert not layer.gemv_applies(prefill) and torch.equal(layer(prefill), F.linear(prefill, layer.weight))


@pytest.mark.cuda
@requires_cuda
def test_bf16_decode_step_runs_each_ffn_gated(tiny_checkpoint, monkeypatch):
    """The tiny model in bf16 on the GPU: a one-token step runs each slow layer's gate, up and SiLU x up through the
    gated float GEMV, and matches the layers run one by one."""
    from quant.kernels import gemv8 as gemv8_module
    from runtime import model as model_module
    from runtime.loader import load_model
    from test_model import frames_sequence

    model = load_model(tiny_checkpoint, torch.device("cuda"), torch.bfloat16).model
    tokens = frames_sequence(model.config, 6, 3, seed=2)[0][None].cuda()
    model.setup_caches(64, torch.bfloat16, torch.device("cuda"))
    calls = {"plain": 0, "gated": 0}

    def counted(*args, _kernel=gemv8_module.gemv_float, **kwargs):
        calls["gated" if kwargs.get("up") is not None else "plain"] += 1
        return _kernel(*args, **kwargs)

    monkeypatch.setattr(gemv8_module, "gemv_float", counted)
    layers = model.config.slow.n_layer
    with torch.inference_mode():
        model.forward_slow(tokens, 0)  # the prompt: cuBLAS
        assert calls == {"plain": 0, "gated": 0}
        step = tokens[..., -1:], torch.tensor([tokens.shape[-1]], device="cuda")
        gated = model.forward_slow(*step).float()
        assert calls == {"plain": 3 * layers, "gated": layers}  # wqkv, wo, w2 plain; w1 with w3 gated
        monkeypatch.setattr(model_module, "silu_gated", lambda *args: None)
        three = model.forward_slow(*step).float()
    assert calls == {"plain": 8 * layers, "gated": layers}
    assert error_stats(gated, three).rel_fro < 1e-2
