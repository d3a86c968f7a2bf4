"""Building blocks of the S2 Pro codec ("modded DAC"): causal convolutions, Snake, residual and ConvNeXt
units, the sliding-window transformer, and `CausalPipeline`, which runs a chain of them over a sequence
that arrives in pieces.

Every layer is causal, so a long sequence can be processed chunk by chunk: convolution stacks are re-run
over a short window of past input (their receptive field, computed from the layers), transformers keep the
keys and values of their last `window - 1` positions. The pieces concatenate to the whole-sequence result.
Module and parameter names mirror the official checkpoint so that `codec.pth` loads unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# How a checkpoint stores a weight-normed convolution: torch.nn.utils.parametrizations.weight_norm
# ("parametrized": `parametrizations.weight.original0/1`) or the older torch.nn.utils.weight_norm
# ("legacy": `weight_g/weight_v`). Our modules hold the folded plain weight; the tag tells the loader and
# the synthetic writer which keys the official file uses.
WeightNormStyle = Literal["parametrized", "legacy"]
Conv = TypeVar("Conv", nn.Conv1d, nn.ConvTranspose1d)


def weight_normed(conv: Conv, style: WeightNormStyle) -> Conv:
    """Tag `conv` as stored with weight norm in `style` (see `WeightNormStyle`)."""
    conv.weight_norm_style = style
    return conv


def fold_weight_norm(g: Tensor, v: Tensor) -> Tensor:
    """W = g * v / ||v||, the norm taken over every dim but 0 (torch's weight_norm with dim=0), in fp32."""
    v = v.float()
    norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
    return g.float() * (v / norm)


class CausalLayer(nn.Module):
    """A layer whose output step t depends only on input steps up to the end of t's frame.

    `down` input steps make one output step (a strided conv), or one input step makes `up` output steps
    (a transposed conv). When a sequence is processed piece by piece, `history(n)` says how many input steps
    from before the piece must be supplied for the piece's outputs, and the n outputs just before them, to
    come out exact; applied from the last layer back to the first it gives a stack's receptive field.
    """

    down: int = 1
    up: int = 1

    def history(self, needed: int) -> int:
        return needed


class CausalConv1d(CausalLayer):
    """Conv1d padded on the left by (effective kernel - stride) and on the right up to a whole stride."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, dilation: int = 1,
                 groups: int = 1, weight_norm: WeightNormStyle | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, dilation=dilation, groups=groups)
        if weight_norm:
            weight_normed(self.conv, weight_norm)
        self.down = stride
        self.span = (kernel - 1) * dilation + 1
        assert self.span >= stride, "a causal conv needs kernel >= stride"

    def forward(self, x: Tensor) -> Tensor:  # [B, C_in, L] -> [B, C_out, ceil(L / stride)]
        right = -x.shape[-1] % self.down
        return self.conv(F.pad(x, (self.span - self.down, right)))

    def history(self, needed: int) -> int:
        return needed * self.down + self.span - self.down


class CausalConvTranspose1d(CausalLayer):
    """ConvTranspose1d with the last (kernel - stride) outputs trimmed: L inputs give L * stride outputs."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int,
                 weight_norm: WeightNormStyle | None = None) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(c_in, c_out, kernel, stride=stride)
        if weight_norm:
            weight_normed(self.conv, weight_norm)
        self.up = stride
        self.kernel = kernel

    def forward(self, x: Tensor) -> Tensor:  # [B, C_in, L] -> [B, C_out, L * stride]
        y = self.conv(x)
        return y[..., : x.shape[-1] * self.up]

    def history(self, needed: int) -> int:
        # output t sees inputs i with i * stride <= t <= i * stride + kernel - 1
        return (needed + self.kernel - 1) // self.up


class Snake1d(CausalLayer):
    """x + sin^2(alpha x) / alpha, per channel (the 1e-9 keeps alpha = 0 finite)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class Tanh(CausalLayer):
    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x)


class ResidualUnit(CausalLayer):
    """x + conv1(snake(conv7_dilated(snake(x))))."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(channels),
            CausalConv1d(channels, channels, 7, dilation=dilation, weight_norm="parametrized"),
            Snake1d(channels),
            CausalConv1d(channels, channels, 1, weight_norm="parametrized"),
        )
        self.dilation = dilation

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)

    def history(self, needed: int) -> int:
        return needed + 6 * self.dilation


class ConvNeXtBlock(CausalLayer):
    """Causal depthwise conv k7 -> LayerNorm -> Linear(C, 4C) -> GELU -> Linear(4C, C) -> x gamma, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), 1e-6))
        self.dwconv = CausalConv1d(channels, channels, 7, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.pwconv1 = nn.Linear(channels, 4 * channels)
        self.pwconv2 = nn.Linear(4 * channels, channels)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T]
        y = self.norm(self.dwconv(x).transpose(1, 2))  # [B, T, C]
        y = self.pwconv2(F.gelu(self.pwconv1(y))) * self.gamma
        return x + y.transpose(1, 2)

    def history(self, needed: int) -> int:
        return needed + 6


class Chain(nn.Module):
    """A plain sequence of layers stored under `block.N` (the official EncoderBlock/DecoderBlock)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


# ---------------------------------------------------------------------------------------------------
# Sliding-window transformer


def rope_table(start: int, length: int, head_dim: int, base: float, device: torch.device) -> Tensor:
    """(cos, sin) of positions start..start+length-1, [length, head_dim/2, 2], rounded to bf16 like the
    reference's precomputed table."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(start, start + length, device=device).float(), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).to(torch.bfloat16)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) in fp32. x: [B, T, H, D], table: [T, D/2, 2]."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, T, H, D/2, 2]
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).type_as(x)


def window_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Causal sliding-window attention without a [T, T] mask.

    q: [B, H, T, D], the new positions p..p+T-1; k, v: [B, H, C + T, D], whose first C (< window) rows are
    cached positions p-C..p-1. Query t attends keys t-window+1..t. Queries are cut into blocks of `window`;
    block c attends a 2*window slice of keys (the previous block and its own) through one shared band mask,
    so the work and memory are O(T * window).
    """
    b, h, t, d = q.shape
    cached = k.shape[2] - t
    assert 0 <= cached < window
    blocks = -(-t // window)
    right = blocks * window - t
    q = F.pad(q, (0, 0, 0, right))
    # left pad so that key j sits at j + window - cached: block c's keys are then rows [c*w, c*w + 2w)
    k = F.pad(k, (0, 0, window - cached, right))
    v = F.pad(v, (0, 0, window - cached, right))

    def key_blocks(x: Tensor) -> Tensor:  # [B, H, (blocks+1)*w, D] -> [B*blocks, H, 2w, D]
        x = x.unfold(2, 2 * window, window).transpose(-1, -2)  # [B, H, blocks, 2w, D]
        return x.transpose(1, 2).reshape(b * blocks, h, 2 * window, d)

    qb = q.view(b, h, blocks, window, d).transpose(1, 2).reshape(b * blocks, h, window, d)
    i = torch.arange(window, device=q.device)[:, None]
    j = torch.arange(2 * window, device=q.device)[None, :]
    mask = ((j > i) & (j <= i + window)).expand(blocks, 1, window, 2 * window).clone()
    mask[0] &= j >= window - cached  # the left padding before the first cached key
    y = F.scaled_dot_product_attention(qb, key_blocks(k), key_blocks(v), attn_mask=mask.repeat(b, 1, 1, 1))
    return y.view(b, blocks, h, window, d).transpose(1, 2).reshape(b, h, blocks * window, d)[:, :, :t]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-2))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, rope: Tensor, window: int, past: tuple[Tensor, Tensor] | None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, T, dim] -> (y [B, T, dim], keys, values [B, H, C+T, D] including the cached ones)."""
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.heads, self.head_dim).unbind(2)  # [B, T, H, D] each
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = window_attention(q, k, v, window)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1)), k, v


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, head_dim: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.attention = Attention(dim, head_dim)
        self.feed_forward = FeedForward(dim, hidden)
        self.ffn_norm = RMSNorm(dim, eps)
        self.attention_norm = RMSNorm(dim, eps)
        self.attention_layer_scale = LayerScale(dim)
        self.ffn_layer_scale = LayerScale(dim)

    def forward(self, x: Tensor, rope: Tensor, window: int, past: tuple[Tensor, Tensor] | None
                ) -> tuple[Tensor, Tensor, Tensor]:
        a, k, v = self.attention(self.attention_norm(x), rope, window, past)
        h = x + self.attention_layer_scale(a)
        return h + self.ffn_layer_scale(self.feed_forward(self.ffn_norm(h))), k, v


@dataclass
class WindowCache:
    """Streaming state of a `WindowTransformer`: the next position and each layer's last keys/values."""

    position: int = 0
    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)


class WindowTransformer(nn.Module):
    """Pre-norm transformer with LayerScale, causal attention limited to the last `window` positions,
    interleaved RoPE; channels-first input and output like the convolutions around it."""

    def __init__(self, dim: int, layers: int, head_dim: int, hidden: int, window: int,
                 rope_base: float, eps: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerBlock(dim, head_dim, hidden, eps) for _ in range(layers))
        self.norm = RMSNorm(dim, eps)
        self.window, self.head_dim, self.rope_base = window, head_dim, rope_base

    def forward(self, x: Tensor, cache: WindowCache | None = None) -> Tensor:
        """x: [B, dim, T] -> [B, dim, T]. With a cache, x continues the sequence the cache has seen and
        the cache is advanced past it."""
        cache = cache if cache is not None else WindowCache()
        keep = self.window - 1
        h = x.transpose(1, 2)  # [B, T, dim]
        rope = rope_table(cache.position, h.shape[1], self.head_dim, self.rope_base, h.device)
        fresh = not cache.keys
        for i, layer in enumerate(self.layers):
            h, k, v = layer(h, rope, self.window, None if fresh else (cache.keys[i], cache.values[i]))
            k, v = k[:, :, k.shape[2] - min(keep, k.shape[2]):], v[:, :, v.shape[2] - min(keep, v.shape[2]):]
            if fresh:
                cache.keys.append(k)
                cache.values.append(v)
            else:
                cache.keys[i], cache.values[i] = k, v
        cache.position += h.shape[1]
        return self.norm(h).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------
# Running a causal chain piece by piece


def causal_leaves(module: nn.Module) -> list[nn.Module]:
    """Flatten Sequential and Chain containers into the causal layers and transformers they hold."""
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in causal_leaves(child)]
    if isinstance(module, Chain):
        return causal_leaves(module.block)
    assert isinstance(module, (CausalLayer, WindowTransformer)), f"not a causal layer: {type(module).__name__}"
    return [module]


class _ConvRun:
    """A stack of causal conv layers fed in pieces: each piece is computed together with the last
    `history` inputs (the receptive field, rounded to whole strides so every strided layer keeps its
    frame grid) and only the new outputs are kept. Pieces must be whole multiples of `down`."""

    def __init__(self, layers: Sequence[CausalLayer]) -> None:
        self.layers = layers
        self.down = math.prod(layer.down for layer in layers)
        self.up = math.prod(layer.up for layer in layers)
        needed = 0
        for layer in reversed(layers):
            needed = layer.history(needed)
        self.history = -(-needed // self.down) * self.down
        self.past: Tensor | None = None

    def push(self, x: Tensor) -> Tensor:
        new = x.shape[-1]
        assert new % self.down == 0, f"piece of {new} steps is not a multiple of {self.down}"
        if self.past is not None:
            x = torch.cat([self.past, x], dim=-1)
        self.past = x[..., x.shape[-1] - min(self.history, x.shape[-1]):]
        for layer in self.layers:
            x = layer(x)
        return x[..., x.shape[-1] - new * self.up // self.down:]


class _TransformerRun:
    def __init__(self, transformer: WindowTransformer) -> None:
        self.transformer, self.cache = transformer, WindowCache()

    def push(self, x: Tensor) -> Tensor:
        return self.transformer(x, self.cache)


class CausalPipeline:
    """Runs a chain of causal layers and window transformers over a sequence given in pieces.

    `push` returns the outputs of the new piece only; the outputs of all pieces concatenate to the output
    of one push of the whole sequence (up to float rounding). Each piece must be a whole number of frames of
    the strided convolutions (2048 samples for the encoder). One pipeline per sequence: it holds state.
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.stages: list[_ConvRun | _TransformerRun] = []
        convs: list[CausalLayer] = []
        for layer in layers:
            if isinstance(layer, WindowTransformer):
                if convs:
                    self.stages.append(_ConvRun(convs))
                    convs = []
                self.stages.append(_TransformerRun(layer))
            else:
                convs.append(layer)
        if convs:
            self.stages.append(_ConvRun(convs))

    def push(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage.push(x)
        return x
