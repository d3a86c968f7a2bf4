"""The S2 Pro Dual-AR: a Qwen3-shaped slow AR over time and a 4-layer fast AR over the 10 codebooks of a frame.

One definition serves CPU eager, GPU eager and CUDA-graph replay; precision modes only swap the `nn.Linear`
modules (the float ones are `FloatLinear`: our GEMV for one token on a GPU). Numerics follow the reference (spec
sections 2-3): block RMSNorm rounds before the gain multiply, QK-norm (slow AR only) multiplies in fp32 and rounds
once, RoPE uses interleaved pairs with a bf16 (cos, sin) table, audio positions embed as (token + 10 codebook rows)
/ sqrt(11), and the fast AR reads the *normed* slow hidden.
On a GPU each residual add with the norm after it, each attention's QK-norm + RoPE of q and k with the K/V cache
writes and each SiLU x up is one Triton kernel (`fused_kernels`) with that same arithmetic; the torch expressions
here are what the CPU runs.

Unlike the reference, the KV cache is sized to the request and attention reads only the valid prefix, and GQA
is left to SDPA (`enable_gqa`) instead of copying K/V four times. A slow step at a position held on the device
(`DevicePosition`: what a captured CUDA graph replays frame after frame) writes K/V with `index_copy_` and attends
over the whole cache through a mask instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quant.base import FloatLinear, silu_gated
from quant.kernels import kernels_supported
from runtime.config import ModelConfig, StackConfig


@dataclass(frozen=True)
class DevicePosition:
    """One slow-AR position as device tensors, so the same kernels serve every position: `index` [1] int64 and
    `visible` [1, capacity] bool, the cache slots at or before it (SDPA's mask for the one query)."""

    index: torch.Tensor
    visible: torch.Tensor


def fused_kernels(x: torch.Tensor) -> bool:
    """Whether the norms and RoPE of x run as one Triton kernel each (quant/kernels/norm_rope.py): bf16 on a GPU
    our kernels support, gradients off (the kernels have no backward). Elsewhere (CPU, no Triton, older GPUs,
    training) the torch expressions below, the same numerics."""
    return x.is_cuda and x.dtype == torch.bfloat16 and not torch.is_grad_enabled() and kernels_supported(x.device)


class RMSNorm(nn.Module):
    """Block / final norm: normalise in fp32, round to the activation dtype, then multiply by the gain."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x):
            from quant.kernels.norm_rope import rms_norm

            return rms_norm(x, self.weight, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight

    def add(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add and this norm of its result: (x + delta, norm(x + delta))."""
        if self._fused(x) and self._fused(delta):
            from quant.kernels.norm_rope import add_rms_norm

            return add_rms_norm(x, delta, self.weight, self.eps)
        total = x + delta
        return total, self(total)

    def _fused(self, x: torch.Tensor) -> bool:
        return fused_kernels(x) and x.is_contiguous() and self.weight.dtype == x.dtype


class HeadNorm(RMSNorm):
    """QK-norm over head_dim (torch.nn.RMSNorm semantics): the gain multiply happens in fp32, one rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).type_as(x)


def rope_table(positions: int, head_dim: int, base: float) -> torch.Tensor:
    """(cos, sin) per position and pair, rounded to bf16 as the reference does: [positions, head_dim/2, 2]."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).to(torch.bfloat16)


def norm_rope(x: torch.Tensor, norm: HeadNorm | None, table: torch.Tensor) -> torch.Tensor:
    """q or k [B, T, H, D]: QK-norm where the stack has it, then RoPE."""
    return apply_rope(x if norm is None else norm(x), table)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) in fp32. x: [B, T, H, D]; table: [T, D/2, 2]."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # [B, T, H, D/2, 2]
    t = table.float().view(1, xs.shape[1], 1, xs.shape[3], 2)
    cos, sin = t[..., 0], t[..., 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x)


class KVCache(nn.Module):
    """Static K/V storage for one layer: [1, kv_heads, capacity, head_dim], allocated once per request size."""

    def __init__(self, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (1, kv_heads, capacity, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def check(self, start: int | DevicePosition, t: int) -> None:
        if not isinstance(start, DevicePosition) and start + t > self.capacity:
            raise ValueError(f"positions {start}..{start + t - 1} exceed the cache of {self.capacity}")

    def update(self, start: int | DevicePosition, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [1, kv_heads, T, D] at positions start..start+T-1; return the valid prefix views (the whole
        cache for a device position, T = 1)."""
        t = k.shape[2]
        self.check(start, t)
        if isinstance(start, DevicePosition):
            self.k.index_copy_(2, start.index, k)
            self.v.index_copy_(2, start.index, v)
        else:
            self.k[:, :, start : start + t] = k
            self.v[:, :, start : start + t] = v
        return self.visible(start, t)

    def visible(self, start: int | DevicePosition, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(start, DevicePosition):
            return self.k, self.v
        return self.k[:, :, : start + t], self.v[:, :, : start + t]


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: DevicePosition) -> torch.Tensor:
    """One query [B, 32, 1, D] over the whole cache k, v [B, 8, capacity, D] at a device position: on a GPU our
    kernel reads only the slots up to the position; elsewhere SDPA with the visibility mask (equal to bf16
    rounding)."""
    if fused_kernels(q):
        from quant.kernels import decode_attention as kernel

        if kernel.takes(q, k):
            return kernel.decode_attention(q, k, v, start.index)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=start.visible, enable_gqa=True)


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Queries [B, 32, T, D] at positions start.. over the valid prefix k, v [B, 8, start+T, D]: causal among the
    queries, all of the earlier positions. One token over a few positions (the fast AR's steps) runs our
    one-launch kernel on a GPU; SDPA otherwise."""
    t = q.shape[2]
    if t == 1 and fused_kernels(q):
        from quant.kernels import decode_attention as kernel

        if kernel.takes_short(q, k, v):
            return kernel.short_attention(q, k, v)
    mask = None
    if t > 1 and start > 0:  # a chunk after earlier positions: causal within, full over the past
        pos = torch.arange(start + t, device=q.device)
        mask = pos[None, :] <= (start + torch.arange(t, device=q.device))[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=t > 1 and start == 0, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, stack: StackConfig, eps: float):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = stack.n_head, stack.n_local_heads, stack.head_dim
        self.wqkv = FloatLinear(stack.dim, stack.qkv_rows, bias=False)
        self.wo = FloatLinear(stack.n_head * stack.head_dim, stack.dim, bias=False)
        self.q_norm = HeadNorm(stack.head_dim, eps) if stack.qk_norm else None
        self.k_norm = HeadNorm(stack.head_dim, eps) if stack.qk_norm else None
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, start: int | DevicePosition) -> torch.Tensor:
        b, t, _ = x.shape
        hd = self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * hd, self.n_kv * hd, self.n_kv * hd], dim=-1)
        q = q.view(b, t, self.n_head, hd)  # [B, T, 32, 128]
        k = k.view(b, t, self.n_kv, hd)  # [B, T, 8, 128]
        v = v.view(b, t, self.n_kv, hd)
        q, k, v = self.rope_and_cache(q, k, v, rope, start)  # k, v [B, 8, start+T, D]: the valid prefix only
        if isinstance(start, DevicePosition):  # k, v: the whole cache [B, 8, capacity, D]
            y = cached_attention(q, k, v, start)
        else:
            y = prefix_attention(q, k, v, start)
        return self.wo(y.transpose(1, 2).reshape(b, t, self.n_head * hd))

    def rope_and_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor,
                       start: int | DevicePosition) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, T, 32, D], k and v [B, T, 8, D]: QK-norm + RoPE of q and k, k and v into the cache ->
        (q [B, 32, T, D], the cache's valid k and v [B, 8, start+T, D]). One kernel on a GPU."""
        cache = self.kv_cache
        if fused_kernels(q):
            from quant.kernels import norm_rope as kernels

            if kernels.takes(q, k, v):
                cache.check(start, q.shape[1])
                norms = (None, None, 0.0) if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight,
                                                                       self.q_norm.eps)
                q = kernels.rope_qkv(q, k, v, *norms, rope, cache.k, cache.v,
                                     start.index if isinstance(start, DevicePosition) else start)
                return (q.transpose(1, 2), *cache.visible(start, q.shape[1]))
        q, k = norm_rope(q, self.q_norm, rope), norm_rope(k, self.k_norm, rope)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # [B, H, T, D]
        return (q, *cache.update(start, k, v))


class FeedForward(nn.Module):
    def __init__(self, stack: StackConfig):
        super().__init__()
        self.w1 = FloatLinear(stack.dim, stack.intermediate_size, bias=False)  # gate
        self.w3 = FloatLinear(stack.dim, stack.intermediate_size, bias=False)  # up
        self.w2 = FloatLinear(stack.intermediate_size, stack.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each [B, T, intermediate] temporary is freed as soon as it is used (the planner's peak): gate and up live
        # only inside the expressions that consume them.
        if fused_kernels(x):
            from quant.kernels.swiglu import silu_mul

            hidden = silu_gated(self.w1, self.w3, x)  # one launch for one token on quantized layers
            return self.w2(hidden if hidden is not None else silu_mul(self.w1(x), self.w3(x)))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """One pre-norm transformer block's modules; run_stack runs them."""

    def __init__(self, stack: StackConfig, eps: float):
        super().__init__()
        self.attention = Attention(stack, eps)
        self.feed_forward = FeedForward(stack)
        self.attention_norm = RMSNorm(stack.dim, eps)
        self.ffn_norm = RMSNorm(stack.dim, eps)


def run_stack(layers: nn.ModuleList, final_norm: RMSNorm, x: torch.Tensor, rope: torch.Tensor,
              start: int | DevicePosition) -> torch.Tensor:
    """The blocks of one AR over x [B, T, D], then its final norm -> normed hidden [B, T, D].

    x + attention(attention_norm(x)), then h + feed_forward(ffn_norm(h)) per block, with each residual add done
    together with the norm that follows it (the block's ffn_norm, the next block's attention_norm or the final
    norm): one launch on a GPU. Written as one loop so that only the stream and its norm stay referenced.
    """
    normed = layers[0].attention_norm(x)
    for i, layer in enumerate(layers):
        x, normed = layer.ffn_norm.add(x, layer.attention(normed, rope, start))
        next_norm = layers[i + 1].attention_norm if i + 1 < len(layers) else final_norm
        x, normed = next_norm.add(x, layer.feed_forward(normed))
    return normed


class DualAR(nn.Module):
    """Parameter names equal the runtime keys of the checkpoint (spec 1.4), so loading is a name lookup."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.embeddings = nn.Embedding(c.vocab_size, c.dim)  # also the (tied) LM head
        self.codebook_embeddings = nn.Embedding(c.codebook_size * c.num_codebooks, c.dim)
        self.layers = nn.ModuleList(Block(c.slow, c.norm_eps) for _ in range(c.slow.n_layer))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.fast_embeddings = nn.Embedding(c.codebook_size, c.fast.dim)
        self.fast_layers = nn.ModuleList(Block(c.fast, c.norm_eps) for _ in range(c.fast.n_layer))
        self.fast_norm = RMSNorm(c.fast.dim, c.norm_eps)
        self.fast_output = FloatLinear(c.fast.dim, c.codebook_size, bias=False)
        # The slow head may only emit <|im_end|> or a semantic token: index 0 -> im_end, 1 + c -> semantic c.
        # Built on the CPU explicitly: the loader constructs the model under a meta-device context.
        legal = torch.cat(
            [
                torch.tensor([c.im_end_id], device="cpu"),
                torch.arange(c.semantic_begin_id, c.semantic_end_id + 1, device="cpu"),
            ]
        )
        self.register_buffer("legal_ids", legal, persistent=False)
        self.head: FloatLinear | None = None  # rows of `embeddings` at legal_ids, built by build_head()
        self.rope: torch.Tensor | None = None
        self.fast_rope: torch.Tensor | None = None
        self.cache_slots: torch.Tensor | None = None  # arange(capacity): masks the cache for a device position
        self.frame_loop: object | None = None  # runtime.decode keeps the last request's frame loop (its graph) here

    # ----- setup --------------------------------------------------------------------------------------------
    def build_head(self) -> None:
        """Gather the 4 097 legal rows of the tied head: same logits as the constrained full head, 38x less work."""
        table = self.embeddings.weight.detach()
        weight = table[self.legal_ids.to(table.device)].to(self.legal_ids.device)
        self.head = FloatLinear(self.config.dim, weight.shape[0], bias=False, device="meta")
        self.head.weight = nn.Parameter(weight.clone(), requires_grad=False)

    def setup_caches(self, capacity: int, dtype: torch.dtype, device: torch.device | str) -> None:
        """Allocate the slow KV cache for `capacity` positions and the 10-slot fast cache; build RoPE tables."""
        c = self.config
        device = torch.device(device)
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(c.slow.n_local_heads, capacity, c.slow.head_dim, dtype, device)
        for layer in self.fast_layers:
            layer.attention.kv_cache = KVCache(c.fast.n_local_heads, c.num_codebooks, c.fast.head_dim, dtype, device)
        self.rope = rope_table(capacity, c.slow.head_dim, c.rope_base).to(device)
        self.fast_rope = rope_table(c.num_codebooks, c.fast.head_dim, c.rope_base).to(device)
        self.cache_slots = torch.arange(capacity, device=device)

    @property
    def capacity(self) -> int:
        return 0 if self.rope is None else self.rope.shape[0]

    # ----- slow AR ------------------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor, legal_only: bool = False) -> torch.Tensor:
        """tokens [B, 1 + num_codebooks, T] -> x [B, T, D]. Audio positions: (token + sum of codebook rows)/sqrt(11).

        `legal_only`: every token is one the head may emit (a generated frame), so its text row is read from the
        head's copy of the legal rows, on the device even when the table lives in host RAM (no host round trip:
        the decode step stays capturable as a CUDA graph).
        """
        c = self.config
        ids = tokens[:, 0]  # [B, T]
        if legal_only:  # head row 0 is <|im_end|>, row 1 + k semantic token k
            x = F.embedding(torch.where(ids == c.im_end_id, 0, ids - c.semantic_begin_id + 1), self.head.weight)
        else:
            table = self.embeddings.weight
            x = F.embedding(ids.to(table.device), table).to(tokens.device)  # the table may live in host RAM
        offsets = torch.arange(c.num_codebooks, device=tokens.device) * c.codebook_size
        vq = self.codebook_embeddings(tokens[:, 1:] + offsets[None, :, None]).sum(dim=1)  # [B, T, D]
        is_audio = ((ids >= c.semantic_begin_id) & (ids <= c.semantic_end_id))[..., None]
        return torch.where(is_audio, (x + vq) / math.sqrt(c.num_codebooks + 1), x)

    def forward_slow(self, tokens: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """Run the slow AR over T new positions starting at `start`; returns the normed hidden [B, T, D].

        `start` may be a [1] int64 tensor on the device, for one generated frame (T = 1, legal tokens only): no
        host value and no host table read, so the step can be graph-captured.
        """
        x = self.embed(tokens, legal_only=isinstance(start, torch.Tensor))
        if isinstance(start, torch.Tensor):
            rope = self.rope.index_select(0, start)
            start = DevicePosition(start, (self.cache_slots <= start)[None])  # [1 query, capacity]
        else:
            rope = self.rope[start : start + x.shape[1]]
        return run_stack(self.layers, self.norm, x, rope, start)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the legal ids only: [..., 1 + num_semantic]."""
        return self.head(hidden)

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary through the tied head: [..., vocab]."""
        return F.linear(hidden, self.embeddings.weight)

    # ----- fast AR ------------------------------------------------------------------------------------------
    def forward_fast(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """One fast-AR position (0 = the slow hidden, k = codebook k-1's embedding): x [B, 1, D] -> normed [B, 1, D]."""
        rope = self.fast_rope[pos : pos + 1]
        return run_stack(self.fast_layers, self.fast_norm, x, rope, pos)

    def fast_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fast_output(hidden)
