"""Write a codec.pth in the exact layout of the released S2 Pro file, with random weights.

Tests and benchmarks need the real file's keys, shapes, weight-norm pairs and stale buffers, not its
trained values. Every parameter is randomised (also the LayerScale gammas and Snake alphas that start at
constants) so that every path of the network shows in its output.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from runtime.codec import Codec, CodecConfig
from runtime.codec_checkpoint import checkpoint_entries
from runtime.codec_layers import ConvNeXtBlock, LayerScale, RMSNorm, Snake1d, WeightNormStyle, WindowTransformer
from runtime.files import atomic_path


def randomize(codec: Codec, seed: int) -> None:
    """Give the parameters that PyTorch initialises to constants random values, in place."""
    g = torch.Generator().manual_seed(seed)

    def uniform(t: Tensor, low: float, high: float) -> None:
        t.copy_(torch.rand(t.shape, generator=g) * (high - low) + low)

    with torch.no_grad():
        for module in codec.modules():
            if isinstance(module, Snake1d):
                uniform(module.alpha, 0.5, 2.0)
            elif isinstance(module, (LayerScale, ConvNeXtBlock)):
                uniform(module.gamma, 0.1, 0.5)
            elif isinstance(module, RMSNorm):
                uniform(module.weight, 0.5, 1.5)
            elif isinstance(module, nn.LayerNorm):
                uniform(module.weight, 0.5, 1.5)
                uniform(module.bias, -0.1, 0.1)


def official_state_dict(codec: Codec, seed: int = 0, style: WeightNormStyle | None = None,
                        stale_blocks: tuple[int, int] | None = None) -> dict[str, Tensor]:
    """The codec's weights keyed like the released file. Weight-normed convs become (g, v) pairs with v a
    randomly rescaled copy of the weight, so folding is exercised; `style` forces one weight-norm style on
    all of them. `stale_blocks` = (encoder, quantizer) block sizes of the reference's unused causal_mask
    and freqs_cis buffers (16384, 4096 in the released file); None leaves them out.

    Consumes the codec: its weights are rescaled in place to avoid a second copy of 1.5 GB.
    """
    g = torch.Generator().manual_seed(seed + 1)
    params = dict(codec.named_parameters())
    transformers = {name: module for name, module in codec.named_modules() if isinstance(module, WindowTransformer)}
    out: dict[str, Tensor] = {}
    for entry in checkpoint_entries(codec, style):
        owner = next((t for t in transformers if entry.key.startswith(f"{t}.layers.0.")), None)
        if stale_blocks and owner is not None and f"{owner}.freqs_cis" not in out:
            block = stale_blocks[0] if owner.startswith("encoder.") else stale_blocks[1]
            out[f"{owner}.freqs_cis"] = torch.zeros(block, transformers[owner].head_dim // 2, 2, dtype=torch.bfloat16)
            out[f"{owner}.causal_mask"] = torch.ones(block, block, dtype=torch.bool).tril()
        weight = params[entry.param].data
        if entry.part == "tensor":
            out[entry.key] = weight
        elif entry.part == "g":
            out[entry.key] = weight.flatten(1).norm(dim=1).view(entry.shape)
        else:
            scale = torch.rand(weight.shape[0], generator=g) * 1.5 + 0.5
            out[entry.key] = weight.mul_(scale.view(-1, *([1] * (weight.dim() - 1))))
    return out


def build_random_codec(config: CodecConfig, seed: int = 0) -> Codec:
    """A full codec (encoder included) with random weights, on the CPU in fp32."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        codec = Codec(config, with_encoder=True)
    randomize(codec, seed)
    return codec.requires_grad_(False)


def random_codes(frames: int, config: CodecConfig, seed: int = 0) -> Tensor:
    """Uniformly random valid codes [10, frames] (int64): row 0 from the semantic book, rows 1.. residual."""
    g = torch.Generator().manual_seed(seed)
    semantic = torch.randint(0, config.semantic_codebook_size, (1, frames), generator=g)
    residual = torch.randint(0, config.codebook_size, (config.residual_codebooks, frames), generator=g)
    return torch.cat([semantic, residual])


def write_synthetic_codec(path: str | Path, config: CodecConfig, seed: int = 0,
                          style: WeightNormStyle | None = None,
                          stale_blocks: tuple[int, int] | None = None) -> Path:
    """Write a random-weight codec.pth in the official layout to `path` (atomically) and return the path."""
    state = official_state_dict(build_random_codec(config, seed), seed, style, stale_blocks)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)
