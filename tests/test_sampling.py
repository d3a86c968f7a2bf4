"""Sampling semantics on hand-made logits: top-k, the reference's top-p order, temperature, RAS, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from runtime.errors import InputError
from runtime.sampling import SamplingParams, filter_top, probabilities, sample, sample_semantic


def reference_probs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """Spec 6.4 written the slow way: full sort, untempered cumsum, strict `> top_p`, rank 0 kept."""
    sorted_logits, order = torch.sort(logits.float(), descending=True)
    cum = torch.softmax(sorted_logits, -1).cumsum(-1)
    remove = (cum > top_p) | (torch.arange(len(logits)) >= top_k)
    remove[0] = False
    keep = torch.full_like(logits.float(), float("-inf"))
    keep[order[~remove]] = logits.float()[order[~remove]]
    return torch.softmax(keep / max(temperature, 1e-5), -1)


def dense(probs: torch.Tensor, indices: torch.Tensor, size: int) -> torch.Tensor:
    return torch.zeros(size).scatter(0, indices, probs)


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


def test_top_p_drops_the_token_that_crosses_the_threshold():
    logits = logits_of([0.5, 0.3, 0.2])
    _, indices = filter_top(logits, top_p=0.7, top_k=30)
    probs, idx = probabilities(logits, SamplingParams(1.0, 0.7, 30))
    # cum = [0.5, 0.8, 1.0]: rank 1 crosses 0.7 and is dropped (HF's shifted rule would keep it)
    assert dense(probs, idx, 3).tolist() == [1.0, 0.0, 0.0]
    probs, idx = probabilities(logits, SamplingParams(1.0, 0.85, 30))
    assert dense(probs, idx, 3) == pytest.approx([0.625, 0.375, 0.0])


def test_rank_zero_always_kept_and_top_k_applies():
    logits = logits_of([0.9, 0.05, 0.05])
    probs, idx = probabilities(logits, SamplingParams(1.0, 0.1, 30))
    assert dense(probs, idx, 3).tolist() == [1.0, 0.0, 0.0]
    flat = torch.zeros(10)
    probs, idx = probabilities(flat, SamplingParams(1.0, 1.0, 4))
    assert (dense(probs, idx, 10) > 0).sum() == 4


def test_temperature_applies_after_filtering():
    logits = logits_of([0.4, 0.35, 0.25])
    probs, idx = probabilities(logits, SamplingParams(0.5, 0.8, 30))  # keeps ranks 0, 1 (cum 0.4, 0.75)
    expected = torch.softmax(torch.log(torch.tensor([0.4, 0.35])) / 0.5, -1)
    assert dense(probs, idx, 3)[:2] == pytest.approx(expected.tolist())


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("params", [(0.8, 0.8, 30), (1.0, 0.9, 5), (0.3, 0.95, 100), (1.5, 1.0, 7)])
def test_matches_full_sort_reference_on_random_logits(seed, params):
    logits = torch.randn(300, generator=torch.Generator().manual_seed(seed)) * 3
    probs, idx = probabilities(logits, SamplingParams(*params))
    torch.testing.assert_close(dense(probs, idx, 300), reference_probs(logits, *params), atol=1e-6, rtol=1e-5)


def test_draws_follow_the_distribution():
    logits = logits_of([0.5, 0.3, 0.2])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, SamplingParams(1.0, 1.0, 30), gen) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=3).float() / 4000
    assert freq.tolist() == pytest.approx([0.5, 0.3, 0.2], abs=0.03)


def test_seed_reproducibility():
    logits = torch.randn(4, 500)
    a = sample(logits, SamplingParams(), torch.Generator().manual_seed(7))
    b = sample(logits, SamplingParams(), torch.Generator().manual_seed(7))
    c = [sample(logits, SamplingParams(), torch.Generator().manual_seed(s)) for s in range(8, 16)]
    assert torch.equal(a, b)
    assert any(not torch.equal(a, x) for x in c)


LEGAL = torch.tensor([99, 200, 201, 202])  # index 0 = <|im_end|>, then semantic ids


def test_ras_replaces_a_repeated_semantic_token():
    # normal draw (top_p 0.3) always gives 200; the fallback (temperature 1, top_p 0.9) gives 200 or 201
    logits = logits_of([0.05, 0.4, 0.38, 0.17])  # fallback cum: 0.4, 0.78, 0.95 -> keeps two
    params = SamplingParams(1.0, 0.3, 30)
    fresh = torch.zeros(10, dtype=torch.int64)
    repeated = fresh.clone()
    repeated[3] = 200
    no_ras = {int(sample_semantic(logits, LEGAL, fresh, params, torch.Generator().manual_seed(s))) for s in range(50)}
    with_ras = [int(sample_semantic(logits, LEGAL, repeated, params, torch.Generator().manual_seed(s))) for s in range(200)]
    assert no_ras == {200}
    assert set(with_ras) == {200, 201}
    assert 0.35 < with_ras.count(201) / 200 < 0.65  # 0.38 / (0.4 + 0.38)


def test_ras_never_replaces_im_end():
    logits = logits_of([0.97, 0.01, 0.01, 0.01])
    window = torch.full((10,), 99)
    draws = {int(sample_semantic(logits, LEGAL, window, SamplingParams(1.0, 0.5, 30), torch.Generator().manual_seed(s)))
             for s in range(30)}
    assert draws == {99}


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"temperature": 2.0}, {"top_p": 0.0}, {"top_p": 1.1},
                                    {"top_k": 0}])
def test_invalid_parameters(kwargs):
    with pytest.raises(InputError):
        SamplingParams(**kwargs)
