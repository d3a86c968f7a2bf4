"""Token sampling exactly as the reference decides which tokens survive (spec 6.4), written without host syncs.

Order: rank the logits; cumulative probability of the *untempered* softmax; drop rank r if cum_r > top_p or
r >= top_k (rank 0 always survives; the token whose mass first crosses top_p is dropped, unlike HF's shifted
rule); then divide by the temperature, softmax, and draw by an exponential race (argmax p / E, E ~ Exp(1)),
which is a multinomial draw. Only the top_k ranks can ever survive, so the work is done on `topk` values with
a full-vocabulary log-sum-exp for the cumulative mass: equal to sorting the whole vocabulary. On a GPU one kernel
does all of it per draw (quant/kernels/sample.py), fed the same Exp(1) noise.

Repetition-aware sampling (RAS): a second draw at temperature 1.0 / top_p 0.9 replaces the normal semantic draw
when that token already appeared among the last 10 semantic tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.kernels import kernels_supported
from runtime.errors import InputError

RAS_WINDOW = 10
RAS_TEMPERATURE = 1.0
RAS_TOP_P = 0.9


@dataclass(frozen=True)
class SamplingParams:
    """Defaults are those of the reference API server and WebUI (temperature 0.8, top_p 0.8, top_k 30)."""

    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 30

    def __post_init__(self) -> None:
        if not 0.0 < self.temperature < 2.0:
            raise InputError(f"temperature must be in (0, 2), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 1:
            raise InputError(f"top_k must be at least 1, got {self.top_k}")

    def ras_fallback(self) -> SamplingParams:
        return SamplingParams(RAS_TEMPERATURE, RAS_TOP_P, self.top_k)


def filter_top(logits: torch.Tensor, top_p: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Surviving candidates of logits [..., V] in rank order: (values with dropped ranks at -inf, vocab indices)."""
    logits = logits.float()
    values, indices = logits.topk(min(top_k, logits.shape[-1]), dim=-1)  # [..., K], descending
    cum = (values - logits.logsumexp(dim=-1, keepdim=True)).exp().cumsum(dim=-1)
    drop = cum > top_p
    drop[..., 0].fill_(False)  # a kernel argument, not a host-to-device copy: CUDA-graph capturable
    return values.masked_fill(drop, float("-inf")), indices


def probabilities(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities [..., K] over the candidates, their vocab indices [..., K])."""
    values, indices = filter_top(logits, params.top_p, params.top_k)
    return torch.softmax(values / max(params.temperature, 1e-5), dim=-1), indices


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one index per row of logits [..., V] -> [...] (int64). On a GPU our kernels support, one launch
    (quant/kernels/sample.py) with the same noise from the same generator."""
    k = min(params.top_k, logits.shape[-1])
    race = torch.empty(*logits.shape[:-1], k, dtype=torch.float32, device=logits.device)
    race.exponential_(1.0, generator=generator)
    if logits.is_cuda and kernels_supported(logits.device):
        from quant.kernels import sample as kernel

        if kernel.takes(logits, k):
            return kernel.sample_rows(logits, race, params.top_p, max(params.temperature, 1e-5))
    probs, indices = probabilities(logits, params)
    choice = (probs / race).argmax(dim=-1, keepdim=True)
    return indices.gather(-1, choice).squeeze(-1)


def sample_semantic(
    logits: torch.Tensor,
    legal_ids: torch.Tensor,
    window: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Draw the next slow token from head logits over `legal_ids` ([..., 1 + num_semantic]), with RAS.

    window: the last RAS_WINDOW slow tokens (zeros before any), compared against the normal draw.
    Returns token ids [...]. Index 0 of legal_ids is <|im_end|>, which RAS never replaces.
    """
    # take(), not legal_ids[index]: a 0-dim index tensor would be read back to the host (no CUDA-graph capture)
    normal = legal_ids.take(sample(logits, params, generator))
    high = legal_ids.take(sample(logits, params.ras_fallback(), generator))
    repeated = (window == normal[..., None]).any(dim=-1) & (normal != legal_ids[0])
    return torch.where(repeated, high, normal)
