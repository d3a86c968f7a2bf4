"""A request's kernels other than the GEMVs, run once on small stand-ins so that they compile while the weights load
(runtime/compile_ahead.py).

Why: on a first run (Triton's cache empty) the first request compiled 12-13 kernels one after another (the block
norms, QK-norm + RoPE in its prefill, decode and fast forms, SiLU x up, the two attentions, sampling for both heads,
NF4's dequantization for the prefill) and built a C launch stub for most of them: 6.4-7.9 s on an H100 host
(benchmarks/results/first-run-*.md). They run here through the model's own code (`run_stack`, `sample`), on one
block per stack whose linear layers return zeros (the GEMVs, and NF4's dequantization through
`QuantizedLinear.prefill_ahead_calls`, compile apart) and whose cache is small, so every launch gets the arguments
Triton specializes on as the real one does: dtypes, constexprs (the stack's dims and heads, the sampling's top_k),
views at the same offsets and integers of the same divisibility (the integers that follow the request, such as the
cache capacity and the prompt's length, are not specialized by the kernels). The draws use the sampling settings
the loading was given (load_model's `sampling`): a request with another top_k compiles its sampling kernel when it
comes. tests/test_stand_in_frame.py checks, on a GPU, that a first request after loading compiles nothing, and on
the CPU (Triton's JIT hook) that the stand-ins ask for every kernel variant a request's stacks do.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import nn

from runtime.config import ModelConfig, StackConfig
from runtime.meta import meta_device
from runtime.model import Block, DevicePosition, DualAR, KVCache, RMSNorm, rope_table, run_stack
from runtime.sampling import SamplingParams, sample

PREFILL_TOKENS = 2  # any prompt length compiles the same kernels
SLOW_SLOTS = 256  # any capacity does (runtime.engine rounds the real one up to a multiple of 256)
LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


class ZeroLinear(nn.Module):
    """A linear layer's stand-in: zeros of its output shape, fresh and contiguous as a layer's output is."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def stand_in_stack(stack: StackConfig, eps: float, slots: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[nn.ModuleList, RMSNorm]:
    """One block of `stack` (zero linears, unit gains in `dtype`, a cache of `slots`) and a final norm."""
    with meta_device():
        block, final = Block(stack, eps), RMSNorm(stack.dim, eps)
    for name in LINEARS:
        parent, _, attr = name.rpartition(".")
        setattr(block.get_submodule(parent), attr, ZeroLinear(block.get_submodule(name).out_features))
    layers = nn.ModuleList([block])
    for module in (layers, final):
        module.to_empty(device=device).to(dtype)
        for parameter in module.parameters():
            parameter.data.fill_(1.0)
    block.attention.kv_cache = KVCache(stack.n_local_heads, slots, stack.head_dim, dtype, device)
    return layers, final


@torch.inference_mode()
def run_stack_forms(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
    """The slow AR's prefill and decode step (a position on the device, as the CUDA graph has it) and one fast-AR
    step, as DualAR.forward_slow and forward_fast run them."""
    with torch.device(device):  # made there: a copy from the host would wait for the loading's queued work
        layers, final = stand_in_stack(config.slow, config.norm_eps, SLOW_SLOTS, dtype, device)
        rope = rope_table(SLOW_SLOTS, config.slow.head_dim, config.rope_base)
        x = torch.zeros(1, PREFILL_TOKENS, config.dim, dtype=dtype)
        run_stack(layers, final, x, rope[:PREFILL_TOKENS], 0)
        index = torch.full((1,), PREFILL_TOKENS, dtype=torch.int64)
        position = DevicePosition(index, (torch.arange(SLOW_SLOTS) <= index)[None])
        run_stack(layers, final, x[:, :1].clone(), rope.index_select(0, index), position)
        layers, final = stand_in_stack(config.fast, config.norm_eps, config.num_codebooks, dtype, device)
        fast_rope = rope_table(config.num_codebooks, config.fast.head_dim, config.rope_base)
        run_stack(layers, final, torch.zeros(1, 1, config.fast.dim, dtype=dtype), fast_rope[:1], 0)


@torch.inference_mode()
def sample_both_heads(config: ModelConfig, legal_tokens: int, dtype: torch.dtype, device: torch.device,
                      params: SamplingParams) -> None:
    """One draw from the slow head's logits over its `legal_tokens` ids and one from a fast head's (a private
    generator: the default one's state is not touched)."""
    generator = torch.Generator(device)
    for width in (legal_tokens, config.codebook_size):
        sample(torch.zeros(width, dtype=dtype, device=device), params, generator)


def frame_calls(model: DualAR, dtype: torch.dtype, device: torch.device,
                sampling: SamplingParams) -> list[Callable[[], object]]:
    """The calls that compile the non-GEMV kernels of a request to `model` (on the meta device is enough) that
    draws with `sampling`; each compiles kernels the other does not."""
    config, legal_tokens = model.config, model.legal_ids.numel()
    return [lambda: run_stack_forms(config, dtype, device),
            lambda: sample_both_heads(config, legal_tokens, dtype, device, sampling)]


def frame_key(model: DualAR, dtype: torch.dtype, sampling: SamplingParams) -> tuple:
    """What the kernels of frame_calls depend on besides the GPU, the libraries and the kernels' sources: the
    model's configuration (hashed), the dtype and the sampling's top_k."""
    return "stand-in frame", hashlib.sha256(repr(model.config).encode()).hexdigest()[:16], dtype, sampling.top_k
