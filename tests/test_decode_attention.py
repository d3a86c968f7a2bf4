"""One decode token's attention over the filled cache slots (quant/kernels/decode_attention.py) against SDPA over
the whole cache with the visibility mask, as the decode step ran it.

GPU only: Triton's interpreter multiplies bf16 tl.dot operands as raw bits (a 16x16 product off by 1e10 with
triton 3.9). Negative controls: a position one slot earlier must differ from the reference by far more than the
kernel does, and NaN in the slots past the position must not change the result (the kernel must not read them).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("triton")

from quant.base import error_stats  # noqa: E402
from quant.kernels.decode_attention import decode_attention, takes  # noqa: E402

DEVICE = torch.device("cuda")


def _case(heads: int, kv_heads: int, capacity: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, 1, d, generator=gen).bfloat16().to(DEVICE)
    k = torch.randn(1, kv_heads, capacity, d, generator=gen).bfloat16().to(DEVICE)
    v = torch.randn(1, kv_heads, capacity, d, generator=gen).bfloat16().to(DEVICE)
    return q, k, v


def _sdpa(q, k, v, position: int) -> torch.Tensor:
    """fp32 SDPA over the whole cache with the decode step's mask (slots 0..position visible)."""
    visible = torch.arange(k.shape[2], device=k.device)[None, :] <= position
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=visible, enable_gqa=True)


# (heads, kv_heads, capacity, head_dim, positions): S2's slow AR (32/8 heads of 128), a capacity that is not a
# whole number of splits, a position at a split's edge, the first and the last slot.
CASES = [
    (32, 8, 768, 128, [0, 127, 128, 535, 767]),
    (8, 2, 300, 64, [5, 299]),
    (4, 4, 130, 32, [129]),
]


@pytest.mark.parametrize("heads, kv_heads, capacity, d, positions", CASES, ids=lambda c: str(c))
def test_matches_sdpa_over_the_visible_slots(heads, kv_heads, capacity, d, positions):
    q, k, v = _case(heads, kv_heads, capacity, d)
    assert takes(q, k)
    for position in positions:
        y = decode_attention(q, k, v, torch.tensor([position], device=DEVICE))
        assert y.shape == q.shape and y.dtype == q.dtype
        expected = _sdpa(q, k, v, position)
        stats = error_stats(y, expected)
        assert stats.rel_fro < 1e-2, (position, stats)
        if position > 0:  # negative control: one slot fewer visible
            assert error_stats(_sdpa(q, k, v, position - 1), expected).rel_fro > 10 * stats.rel_fro


def test_reads_nothing_past_the_position():
    q, k, v = _case(32, 8, 512, 128, seed=1)
    position = torch.tensor([200], device=DEVICE)
    y = decode_attention(q, k, v, position)
    k[:, :, 201:] = float("nan")
    v[:, :, 201:] = float("nan")
    assert torch.equal(decode_attention(q, k, v, position), y)


def test_takes_only_one_token_of_one_sequence():
    q, k, _ = _case(32, 8, 256, 128)
    assert not takes(q.expand(1, 32, 2, 128), k)  # two tokens
    assert not takes(q, k[:, :, ::2])  # a strided cache
    assert not takes(q[..., :96], k[..., :96])  # head_dim not a power of two
    assert not takes(q[:, :30], k)  # heads not a multiple of kv_heads


def test_tiny_model_decode_step_runs_the_kernel_per_slow_layer(tiny_checkpoint, monkeypatch):
    """A one-token slow step at a device position runs our kernel once per layer (counted), and matches the same
    step at a host position (SDPA over the valid prefix)."""
    from quant.kernels import decode_attention as kernel
    from runtime.loader import load_model
    from test_model import frames_sequence

    model = load_model(tiny_checkpoint, DEVICE, torch.bfloat16).model
    tokens = frames_sequence(model.config, 6, 3, seed=2)[0][None].to(DEVICE)
    model.setup_caches(256, torch.bfloat16, DEVICE)
    calls = []

    def counted(*args, _kernel=kernel.decode_attention):
        calls.append(args[-1])
        return _kernel(*args)

    monkeypatch.setattr(kernel, "decode_attention", counted)
    prompt, step, at = tokens[..., :-1], tokens[..., -1:], tokens.shape[-1] - 1
    with torch.inference_mode():
        model.forward_slow(prompt, 0)
        host = model.forward_slow(step, at).float()  # a host position: SDPA over the prefix
        assert calls == []
        device = model.forward_slow(step, torch.tensor([at], device=DEVICE)).float()
    assert len(calls) == model.config.slow.n_layer
    assert error_stats(device, host).rel_fro < 2e-2
