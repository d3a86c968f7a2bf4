"""The one-launch draw (quant/kernels/sample.py) against runtime/sampling.py's torch path, on a GPU: fed the same
noise from the same seed both pick the same tokens (with a negative control: other noise picks others), the draws
follow the filtered distribution, and ties at the top-k cut go to the lowest index."""

from __future__ import annotations

import math

import pytest
import torch

from runtime import sampling
from runtime.sampling import SamplingParams, sample

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]


def draws(logits: torch.Tensor, params: SamplingParams, seed: int) -> torch.Tensor:
    return sample(logits, params, torch.Generator("cuda").manual_seed(seed))


@pytest.mark.parametrize("vocab", [4097, 4096, 300])
@pytest.mark.parametrize("params", [(0.8, 0.8, 30), (1.0, 0.9, 5), (0.3, 0.95, 100), (1.5, 1.0, 7), (0.8, 0.05, 30)])
def test_same_noise_same_tokens_as_the_torch_path(vocab, params, monkeypatch):
    params = SamplingParams(*params)
    logits = torch.randn(256, vocab, generator=torch.Generator().manual_seed(vocab)).cuda() * 3  # no ties
    kernel = draws(logits, params, seed=1)
    with monkeypatch.context() as patch:
        patch.setattr(sampling, "kernels_supported", lambda device: False)
        reference = draws(logits, params, seed=1)
        other_noise = draws(logits, params, seed=2)
    assert kernel.shape == (256,) and kernel.dtype == torch.int64
    assert (kernel == reference).float().mean() >= 0.99
    if params.top_p > 0.5:  # several survivors per row: other noise must change the picks (the check can fail)
        assert (kernel == other_noise).float().mean() < 0.9


def test_bf16_rows_of_the_decode_shapes(monkeypatch):
    """The head's and the fast AR's bf16 logits, as decoding passes them: same tokens as the torch path. bf16
    logits tie often, and torch.topk orders ties as it likes (then the same noise goes to other tokens: the same
    distribution, other draws), so each row's 64 largest logits are made distinct: 8 + j/16, at random places."""
    gen = torch.Generator().manual_seed(5)
    for vocab in (4097, 4096):
        logits = torch.randn(64, vocab, generator=gen) * 2
        places = torch.rand(64, vocab, generator=gen).argsort(dim=1)[:, :64]
        logits.scatter_(1, places, 8 + torch.arange(64.0).expand(64, 64) / 16)
        logits = logits.bfloat16().cuda()
        kernel = draws(logits, SamplingParams(), seed=3)
        with monkeypatch.context() as patch:
            patch.setattr(sampling, "kernels_supported", lambda device: False)
            reference = draws(logits, SamplingParams(), seed=3)
            other_noise = draws(logits, SamplingParams(), seed=4)
        assert (kernel == reference).float().mean() >= 0.99
        assert (kernel == other_noise).float().mean() < 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_p", [0.8, 1.0])
def test_masked_logits_within_the_top_k(dtype, top_p, monkeypatch):
    """Rows with only 5 finite logits and top_k 30: the -inf candidates never win, and the picks are the torch
    path's."""
    gen = torch.Generator().manual_seed(6)
    logits = torch.full((128, 300), float("-inf"))
    places = torch.rand(128, 300, generator=gen).argsort(dim=1)[:, :5]
    logits.scatter_(1, places, torch.randn(128, 5, generator=gen))
    logits = logits.to(dtype).cuda()
    params = SamplingParams(1.0, top_p, 30)
    kernel = draws(logits, params, seed=7)
    with monkeypatch.context() as patch:
        patch.setattr(sampling, "kernels_supported", lambda device: False)
        reference = draws(logits, params, seed=7)
    assert torch.isfinite(logits.gather(1, kernel[:, None])).all()
    assert (kernel == reference).float().mean() >= 0.99


def test_draws_follow_the_distribution():
    logits = torch.tensor([[math.log(p) for p in (0.5, 0.3, 0.2)]], device="cuda").expand(20000, 3)
    freq = torch.bincount(draws(logits, SamplingParams(1.0, 1.0, 30), seed=0), minlength=3).float() / 20000
    assert freq.tolist() == pytest.approx([0.5, 0.3, 0.2], abs=0.015)
    # top_p 0.85: cum 0.5, 0.8, 1.0 -> the third is dropped, the others renormalised
    freq = torch.bincount(draws(logits, SamplingParams(1.0, 0.85, 30), seed=0), minlength=3).float() / 20000
    assert freq.tolist() == pytest.approx([0.625, 0.375, 0.0], abs=0.015)


def test_ties_at_the_cut_go_to_the_lowest_index():
    logits = torch.tensor([[0.0, 2.0, 1.0, 1.0, 1.0]], device="cuda").expand(20000, 5)
    freq = torch.bincount(draws(logits, SamplingParams(1.0, 1.0, 2), seed=0), minlength=5).float() / 20000
    expected = torch.softmax(torch.tensor([2.0, 1.0]), 0).tolist()
    assert freq.tolist() == pytest.approx([0.0, expected[0], expected[1], 0.0, 0.0], abs=0.015)
