"""Helpers for timing generation on synthetic (random-weight) checkpoints."""

from __future__ import annotations

from runtime.model import DualAR


def never_stop(model: DualAR) -> None:
    """Random weights may emit <|im_end|> at any frame: push its logit down so every run decodes all it asks for."""
    real = model.head_logits

    def head_without_stop(hidden):
        logits = real(hidden)
        logits[..., 0].fill_(-1e4)  # legal row 0 is <|im_end|>; fill_, not a host copy: capturable
        return logits

    model.head_logits = head_without_stop
