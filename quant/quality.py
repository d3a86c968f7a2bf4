"""How far a quantized model's next-token distributions are from a reference run (spec/quality-protocol.md).

The field's standard (llama.cpp's perplexity tool): teacher-force both models on the same tokens and compare the
distributions position by position: mean and 99th-percentile KL divergence, and the share of positions where both
put the same token on top. KL is more sensitive than agreement of sampled outputs and needs no ASR or listener.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Agreement:
    mean_kl: float  # nats, KL(reference || test) averaged over positions
    p99_kl: float
    same_top: float  # share of positions with the same argmax

    def __str__(self) -> str:
        return f"KL mean {self.mean_kl:.2e}, p99 {self.p99_kl:.2e}, same top {self.same_top:.1%}"


def agreement(reference: Tensor, test: Tensor) -> Agreement:
    """Logits [..., V] of the reference and the test run at the same positions -> their agreement."""
    if reference.shape != test.shape:
        raise ValueError(f"logits of shapes {tuple(reference.shape)} and {tuple(test.shape)} cannot be compared")
    log_p = F.log_softmax(reference.float(), dim=-1)
    log_q = F.log_softmax(test.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).flatten()  # [positions]
    same = (reference.argmax(dim=-1) == test.argmax(dim=-1)).float().mean()
    return Agreement(kl.mean().item(), torch.quantile(kl, 0.99).item(), same.item())
