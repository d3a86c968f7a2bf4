"""Which inputs our decode kernels accept, checked without a GPU (the checks read shapes and strides only; they
need Triton installed): the q, k, v views the attention makes from its fused projection, at a prompt's length and
at one decode token, where a view's stride over the size-1 token dimension differs between q and k."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")


def attention_views(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As runtime/model.py Attention.forward: split the [1, T, (32 + 2 x 8) x 128] projection, view per head."""
    q, k, v = torch.zeros(1, tokens, 48 * 128).split([32 * 128, 8 * 128, 8 * 128], dim=-1)
    return q.view(1, tokens, 32, 128), k.view(1, tokens, 8, 128), v.view(1, tokens, 8, 128)


@pytest.mark.parametrize("tokens", [1, 5])
def test_rope_qkv_takes_the_attention_views(tokens):
    from quant.kernels.norm_rope import takes

    q, k, v = attention_views(tokens)
    assert takes(q, k, v)
    assert not takes(q, torch.zeros(1, tokens, 128, 8).transpose(2, 3), v)  # k's D values not adjacent
    assert not takes(torch.zeros(2, tokens, 32, 128), k, v)  # the cache holds one sequence


def test_rope_qkv_needs_one_token_stride():
    from quant.kernels.norm_rope import takes

    q, k, v = attention_views(5)
    other = torch.zeros(1, 5, 2 * 8 * 128)[..., : 8 * 128].view(1, 5, 8, 128)  # another token stride
    assert not takes(q, other, v)


def test_the_draw_takes_decode_rows_only_up_to_its_limits():
    from quant.kernels.sample import MAX_TOP_K, MAX_VOCAB, takes

    assert takes(torch.zeros(4097), 30) and takes(torch.zeros(9, 4096), 30)
    assert not takes(torch.zeros(4097), MAX_TOP_K + 1)
    assert not takes(torch.zeros(MAX_VOCAB + 1), 30)
    assert not takes(torch.zeros(4096, 2).t(), 30)  # V not contiguous
