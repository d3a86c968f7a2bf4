"""Synthetic checkpoints in the exact released layout, with random weights.

The real weights cannot be downloaded everywhere this runtime is built and tested, so tests and benchmarks use
folders that match `fishaudio/s2-pro` file for file: config.json (nested form), tokenizer.json (same special ids
for the real config), `model-0000k-of-0000n.safetensors` shards with the official key names in bf16 and
`model.safetensors.index.json`. Weights are drawn per tensor from a seeded generator and written one tensor at a
time, so a 9 GB checkpoint is written with about one tensor of memory.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

import torch

from runtime.checkpoint import INDEX_NAME, SINGLE_NAME, expected_shapes
from runtime.config import ModelConfig
from runtime.files import atomic_path
from runtime.safetensors_io import write_safetensors
from runtime.synthetic_tokenizer import write_tokenizer


def checkpoint_key(runtime_key: str) -> str:
    """Inverse of checkpoint.remap_key: the name the released files use."""
    if runtime_key.startswith("codebook_embeddings."):
        return "audio_decoder." + runtime_key
    if runtime_key.startswith("fast_"):
        return "audio_decoder." + runtime_key[len("fast_") :]
    return "text_model.model." + runtime_key


def random_tensor(key: str, shape: tuple[int, ...], seed: int, device: str = "cpu") -> torch.Tensor:
    """Norm gains near 1, everything else N(0, 0.02): what a trained checkpoint roughly looks like in scale."""
    generator = torch.Generator(device).manual_seed(seed)
    if key.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator, device=device)
    return 0.02 * torch.randn(shape, generator=generator, device=device)


def split_shards(specs: list[tuple[str, tuple[int, ...], torch.dtype]], shards: int) -> list[list[int]]:
    """Consecutive groups of tensors of about equal bytes (slow AR first, so fast-AR keys land in the last)."""
    sizes = [torch.Size(s).numel() * d.itemsize for _, s, d in specs]
    total, target = sum(sizes), sum(sizes) / shards
    groups: list[list[int]] = [[] for _ in range(shards)]
    acc = 0
    for i, size in enumerate(sizes):
        groups[min(int(acc // target), shards - 1)].append(i)
        acc += size
    if any(not g for g in groups) or total == 0:
        raise ValueError(f"cannot split {len(specs)} tensors into {shards} non-empty shards")
    return groups


def write_checkpoint(
    folder: str | Path,
    config: ModelConfig,
    seed: int = 0,
    shards: int = 2,
    device: str = "cpu",
    on_tensor: Callable[[str], None] | None = None,
) -> Path:
    """Write a synthetic S2 Pro checkpoint folder for `config`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = expected_shapes(config)
    specs = [(checkpoint_key(k), shape, torch.bfloat16) for k, shape in shapes.items()]
    seeds = {key: seed * 100_003 + i for i, (key, _, _) in enumerate(specs)}
    by_key = {checkpoint_key(k): (k, shape) for k, shape in shapes.items()}

    def make(key: str) -> torch.Tensor:
        runtime_key, shape = by_key[key]
        tensor = random_tensor(runtime_key, shape, seeds[key], device).to(torch.bfloat16)
        if on_tensor is not None:
            on_tensor(key)
        return tensor

    total_bytes = sum(torch.Size(s).numel() * 2 for _, s, _ in specs)
    if shards == 1:
        write_safetensors(folder / SINGLE_NAME, specs, make, metadata={"format": "pt"})
    else:
        weight_map: dict[str, str] = {}
        for k, group in enumerate(split_shards(specs, shards), start=1):
            name = f"model-{k:05d}-of-{shards:05d}.safetensors"
            shard_specs = [specs[i] for i in group]
            write_safetensors(folder / name, shard_specs, make, metadata={"format": "pt"})
            weight_map.update({key: name for key, _, _ in shard_specs})
        index = {
            "metadata": {"total_parameters": config.parameter_count(), "total_size": total_bytes},
            "weight_map": weight_map,
        }
        with atomic_path(folder / INDEX_NAME) as tmp:
            tmp.write_text(json.dumps(index, indent=2))
    with atomic_path(folder / "config.json") as tmp:
        tmp.write_text(json.dumps(config.to_json(), indent=2))
    write_tokenizer(folder / "tokenizer.json", config)
    return folder


def write_fp8_checkpoint(folder: str | Path, config: ModelConfig, seed: int = 0) -> Path:
    """The community `s2-pro-fp8` layout: one model.safetensors with runtime key names, every linear weight as
    float8_e4m3fn + `.scale` float32 [out, 1] (row absmax / 448), other tensors bf16, plus a saved `_buf.` buffer
    that a loader must skip; config.json and tokenizer.json unchanged."""
    from quant.base import quantize_linear
    from runtime.loader import WeightFormats, linear_format

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = expected_shapes(config)
    specs: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    for key, shape in shapes.items():
        if linear_format(key, WeightFormats("fp8", "fp8")):
            specs += [(key, shape, torch.float8_e4m3fn), (key + ".scale", (shape[0], 1), torch.float32)]
        else:
            specs.append((key, shape, torch.bfloat16))
    specs.append(("_buf.fast_freqs_cis", (config.num_codebooks, config.fast.head_dim // 2, 2), torch.bfloat16))
    seeds = {key: seed * 100_003 + i for i, key in enumerate(shapes)}

    @functools.lru_cache(maxsize=1)  # a weight and then its scale: quantize each linear once
    def fp8(base: str) -> dict[str, torch.Tensor]:
        return quantize_linear(random_tensor(base, shapes[base], seeds[base]).to(torch.bfloat16), "fp8").stored_tensors()

    def make(key: str) -> torch.Tensor:
        if key.startswith("_buf."):
            return torch.zeros(config.num_codebooks, config.fast.head_dim // 2, 2, dtype=torch.bfloat16)
        base = key.removesuffix(".scale")
        if linear_format(base, WeightFormats("fp8", "fp8")):
            return fp8(base)["weight.scale" if key.endswith(".scale") else "weight"]
        return random_tensor(base, shapes[base], seeds[base]).to(torch.bfloat16)

    write_safetensors(folder / SINGLE_NAME, specs, make, metadata={"format": "pt"})
    info = {"quantization_method": "torchao_Float8WeightOnly", "scale_granularity": "per_row"}
    (folder / "quantization_info.json").write_text(json.dumps(info, indent=2))
    with atomic_path(folder / "config.json") as tmp:
        tmp.write_text(json.dumps(config.to_json(), indent=2))
    write_tokenizer(folder / "tokenizer.json", config)
    return folder
