"""The one-launch norm and RoPE kernels (quant/kernels/norm_rope.py) against the model's torch expressions, on a GPU:
at S2 shapes, on the strided q/k/v views the fused QKV projection yields; the residual add with the norm, and
q's and k's RoPE with both cache writes; with negative controls (a wrong eps, the wrong table rows, the wrong slot) so
that the comparisons can fail; and the whole tiny model with and without them (on an H100 the two gave identical
bits there: the call count shows which path ran)."""

from __future__ import annotations

import pytest
import torch

from runtime import model as model_module
from runtime.loader import load_model
from runtime.model import HeadNorm, apply_rope, rope_table
from test_model import frames_sequence

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]


def block_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference's block norm (runtime/model.py RMSNorm, torch path)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def within_one_ulp(y: torch.Tensor, ref: torch.Tensor) -> bool:
    """bf16 results that differ at most in the last bit (the kernels sum the squares in another order); and
    most of them exactly."""
    y, ref = y.float(), ref.float()
    ulp = ref.abs().clamp_min(1e-30) * 2.0**-7
    return bool(((y - ref).abs() <= ulp).all()) and bool((y == ref).float().mean() > 0.95)


@pytest.mark.parametrize("shape", [(1, 1, 2560), (1, 7, 2560), (3, 64)], ids=str)
def test_rms_norm_is_the_block_norm(shape):
    from quant.kernels.norm_rope import rms_norm

    gen = torch.Generator("cuda").manual_seed(0)
    x = (torch.randn(shape, generator=gen, device="cuda") * 3).bfloat16()
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen, device="cuda")).bfloat16()
    assert within_one_ulp(rms_norm(x, weight, 1e-6), block_norm(x, weight, 1e-6))
    assert not within_one_ulp(rms_norm(x, weight, 0.5), block_norm(x, weight, 1e-6))  # the check can fail


@pytest.mark.parametrize("shape", [(1, 1, 2560), (1, 7, 2560), (3, 64)], ids=str)
def test_add_rms_norm_is_the_sum_then_the_block_norm(shape):
    from quant.kernels.norm_rope import add_rms_norm

    gen = torch.Generator("cuda").manual_seed(3)
    x, delta = ((torch.randn(shape, generator=gen, device="cuda") * 3).bfloat16() for _ in range(2))
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen, device="cuda")).bfloat16()
    total, y = add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(total, x + delta)
    assert within_one_ulp(y, block_norm(x + delta, weight, 1e-6))
    assert not within_one_ulp(y, block_norm(x, weight, 1e-6))  # the norm is of the sum, and the check can fail


def qkv_views(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [1, T, H, 128] as views of one [1, T, (32 + 2 x 8) x 128] projection."""
    gen = torch.Generator("cuda").manual_seed(seed)
    qkv = torch.randn(1, tokens, 48 * 128, generator=gen, device="cuda").bfloat16()
    return (qkv[..., : 32 * 128].view(1, tokens, 32, 128), qkv[..., 32 * 128 : 40 * 128].view(1, tokens, 8, 128),
            qkv[..., 40 * 128 :].view(1, tokens, 8, 128))


def head_norm(seed: int) -> HeadNorm:
    norm = HeadNorm(128, 1e-6).cuda()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(128, generator=torch.Generator("cuda").manual_seed(seed),
                                                device="cuda"))
    return norm


@pytest.mark.parametrize("slot", ["int", "device"])
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("tokens", [1, 5])
def test_rope_qkv_returns_q_and_writes_the_cache_slots(tokens, qk_norm, slot):
    """q, k, v as views of one [1, T, (32 + 2 x 8) x 128] projection: q comes back as HeadNorm then apply_rope
    (slow AR; RoPE only in the fast AR), and k (the same) and v land at slots start..start+T-1 of [1, 8, S, 128]
    caches, start an int or a device tensor (one decode token); every other slot is left as it was."""
    from quant.kernels.norm_rope import rope_qkv, takes

    if slot == "device" and tokens > 1:
        pytest.skip("a device position is one decode step")
    q, k, v = qkv_views(tokens, seed=1)
    assert takes(q, k, v) and not takes(q, k.transpose(1, 2), v)
    table = rope_table(64, 128, 1e6).cuda()
    start = 37
    rows, q_norm, k_norm = table[start : start + tokens], head_norm(seed=1), head_norm(seed=2)
    weights = (q_norm.weight, k_norm.weight) if qk_norm else (None, None)
    k_cache, v_cache = (torch.full((1, 8, 64, 128), 7.0, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    where = torch.tensor([start], device="cuda") if slot == "device" else start
    q_rot = rope_qkv(q, k, v, *weights, q_norm.eps, rows, k_cache, v_cache, where)
    q_ref = apply_rope(q_norm(q) if qk_norm else q, rows)
    k_ref = apply_rope(k_norm(k) if qk_norm else k, rows).transpose(1, 2)
    written = slice(start, start + tokens)
    assert q_rot.is_contiguous() and within_one_ulp(q_rot, q_ref)
    assert within_one_ulp(k_cache[:, :, written], k_ref)
    assert torch.equal(v_cache[:, :, written], v.transpose(1, 2))
    others = torch.ones(64, dtype=torch.bool)
    others[written] = False
    assert (k_cache[:, :, others] == 7).all() and (v_cache[:, :, others] == 7).all()
    # negative controls: the wrong table rows; the same keys one slot later, into fresh caches
    assert not within_one_ulp(rope_qkv(q, k, v, *weights, q_norm.eps, table[:tokens], k_cache, v_cache, where),
                              q_ref)
    k_cache.fill_(7.0)
    rope_qkv(q, k, v, *weights, q_norm.eps, rows, k_cache, v_cache, start + 1)
    assert not within_one_ulp(k_cache[:, :, written], k_ref)


def test_tiny_model_with_and_without_the_kernels(tiny_checkpoint, monkeypatch):
    """The tiny model in bf16 on the GPU: every norm (with its residual add), RoPE and SiLU x up of the slow AR
    runs as our kernels (counted), over a prompt and in a one-token decode step (whose SiLU x up runs inside the
    gated GEMV), and its hidden states over the prompt agree with the torch path to bf16 accuracy."""
    from quant.kernels import gemv8  # noqa: F401 (imported before the patch below: its first-call timing of
    from quant.kernels import norm_rope as kernels  # cuBLAS + silu_mul for the gated form stays out of the count)
    from quant.kernels import swiglu

    model = load_model(tiny_checkpoint, torch.device("cuda"), torch.bfloat16).model
    tokens = frames_sequence(model.config, 6, 3, seed=2)[0][None].cuda()
    model.setup_caches(64, torch.bfloat16, torch.device("cuda"))
    calls = {"rms_norm": 0, "add_rms_norm": 0, "rope_qkv": 0, "silu_mul": 0}
    for name in calls:
        module = swiglu if name == "silu_mul" else kernels

        def counted(*args, _kernel=getattr(module, name), _name=name):
            calls[_name] += 1
            return _kernel(*args)
        monkeypatch.setattr(module, name, counted)
    layers = model.config.slow.n_layer
    expected = {"rms_norm": 1, "add_rms_norm": 2 * layers, "rope_qkv": layers, "silu_mul": layers}
    with torch.inference_mode():
        fused = model.forward_slow(tokens, 0).float()
        assert calls == expected
        model.forward_slow(tokens[..., -1:], torch.tensor([tokens.shape[-1]], device="cuda"))  # one decode step
        expected = {name: 2 * n for name, n in expected.items()} | {"silu_mul": layers}  # the step's SiLU x up:
        assert calls == expected  # in the gated GEMV with the FFN's gate and up (tests/test_float_gemv.py)
        monkeypatch.setattr(model_module, "fused_kernels", lambda x: False)
        torch_path = model.forward_slow(tokens, 0).float()
    assert calls == expected  # the torch path: no more calls
    assert (fused - torch_path).norm() / torch_path.norm() < 2e-2
