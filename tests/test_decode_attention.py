"""One decode token's attention over the filled cache slots (quant/kernels/decode_attention.py) against SDPA over
the whole cache with the visibility mask, as the decode step ran it; and over a short cache prefix (the fast AR's
steps) against SDPA over that prefix.

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
from quant.kernels.decode_attention import SHORT, decode_attention, short_attention, takes, takes_short  # noqa: E402,E501

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
    monkeypatch.setattr(kernel, "takes_short", lambda *_: False)  # the host position's step: SDPA, the reference
    prompt, step, at = tokens[..., :-1], tokens[..., -1:], tokens.shape[-1] - 1
    with torch.inference_mode():
        model.forward_slow(prompt, 0)
        host = model.forward_slow(step, at).float()  # a host position: SDPA over the prefix
        assert calls == []
        device = model.forward_slow(step, torch.tensor([at], device=DEVICE)).float()
    assert len(calls) == model.config.slow.n_layer
    assert error_stats(device, host).rel_fro < 2e-2


# (heads, kv_heads, head_dim): S2's fast AR (32/8 heads of 128), the tiny model's (4/2 of 16), no grouping.
SHORT_CASES = [(32, 8, 128), (4, 2, 16), (8, 8, 64)]


@pytest.mark.parametrize("heads, kv_heads, d", SHORT_CASES, ids=lambda c: str(c))
def test_short_attention_matches_sdpa_over_a_cache_prefix(heads, kv_heads, d):
    """The fast AR's form: one query over the first n slots of a cache (a strided view of its valid prefix), every
    n it takes. Negative control: SDPA over one slot fewer is far off."""
    q, k, v = _case(heads, kv_heads, SHORT, d, seed=3)
    for n in range(1, SHORT + 1):
        k_n, v_n = k[:, :, :n], v[:, :, :n]
        assert takes_short(q, k_n, v_n)
        y = short_attention(q, k_n, v_n)
        assert y.shape == q.shape and y.dtype == q.dtype
        expected = F.scaled_dot_product_attention(q.float(), k_n.float(), v_n.float(), enable_gqa=True)
        stats = error_stats(y, expected)
        assert stats.rel_fro < 1e-2, (n, stats)
        if n > 1:
            fewer = F.scaled_dot_product_attention(q.float(), k_n[:, :, :-1].float(), v_n[:, :, :-1].float(),
                                                   enable_gqa=True)
            assert error_stats(fewer, expected).rel_fro > 10 * stats.rel_fro


def test_short_attention_reads_nothing_past_the_prefix_and_replays_from_a_graph():
    q, k, v = _case(32, 8, 11, 128, seed=4)
    y = short_attention(q, k[:, :, :7], v[:, :, :7])
    k[:, :, 7:] = float("nan")
    v[:, :, 7:] = float("nan")
    assert torch.equal(short_attention(q, k[:, :, :7], v[:, :, :7]), y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = short_attention(q, k[:, :, :7], v[:, :, :7])
    graph.replay()
    assert torch.equal(replayed, y)


def test_takes_short_only_a_short_prefix_of_rows():
    q, k, v = _case(32, 8, SHORT + 1, 128)
    assert takes_short(q, k[:, :, :SHORT], v[:, :, :SHORT])
    assert not takes_short(q, k, v)  # one slot too many
    assert not takes_short(q.expand(1, 32, 2, 128), k[:, :, :4], v[:, :, :4])  # two tokens
    assert not takes_short(q, k[:, :, :4, ::2], v[:, :, :4, ::2])  # slots that are not rows of D
    assert not takes_short(q[:, :30], k[:, :, :4], v[:, :, :4])  # heads not a multiple of kv_heads


def test_tiny_model_fast_steps_run_the_short_kernel(tiny_checkpoint, monkeypatch):
    """The fast AR's steps (one token at each of its positions: the slow hidden, then 9 codebooks' embeddings) run
    the short kernel once per layer, and agree with SDPA over the same prefixes."""
    from quant.kernels import decode_attention as kernel
    from runtime.loader import load_model

    model = load_model(tiny_checkpoint, DEVICE, torch.bfloat16).model
    model.setup_caches(64, torch.bfloat16, DEVICE)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(1, 1, model.config.fast.dim, generator=gen).bfloat16().to(DEVICE)
    codes = torch.randint(0, model.config.codebook_size, (model.config.num_codebooks - 1,), generator=gen).to(DEVICE)
    calls = []

    def steps() -> torch.Tensor:
        with torch.inference_mode():
            outs = [model.forward_fast(hidden, 0)]
            for i, code in enumerate(codes, 1):
                outs.append(model.forward_fast(model.fast_embeddings(code).view(1, 1, -1), i))
        return torch.cat(outs).float()

    real = kernel.short_attention
    monkeypatch.setattr(kernel, "short_attention", lambda *a: calls.append(a[1].shape[2]) or real(*a))
    ours = steps()
    assert calls == [n for n in range(1, len(codes) + 2) for _ in range(model.config.fast.n_layer)]
    monkeypatch.setattr(kernel, "takes_short", lambda *_: False)
    assert error_stats(ours, steps()).rel_fro < 2e-2
