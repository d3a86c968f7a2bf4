"""Finding and reading the released checkpoint files without holding more than one tensor in host memory.

The folder is read-only input: `config.json`, `tokenizer.json`, and either `model.safetensors.index.json` with
its shards or a single `model.safetensors`. Nothing is read here but headers; tensors are read one at a time on
demand (see safetensors_io for why not through mmap).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from runtime.config import ModelConfig, StackConfig, load_config
from runtime.errors import CheckpointError
from runtime.safetensors_io import CudaStaging, TensorEntry, read_safetensors_header, read_tensor

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def remap_key(key: str) -> str:
    """Checkpoint key -> runtime module key (spec 1.4). Runtime-form keys (s2-pro-fp8 layout) pass through."""
    if key.startswith("text_model.model."):
        return key[len("text_model.model.") :]
    if key.startswith("audio_decoder.codebook_embeddings."):
        return key[len("audio_decoder.") :]
    if key.startswith("audio_decoder."):
        return "fast_" + key[len("audio_decoder.") :]
    return key


def _stack_shapes(prefix: str, stack: StackConfig) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(stack.n_layer):
        p = f"{prefix}.{i}"
        shapes[f"{p}.attention.wqkv.weight"] = (stack.qkv_rows, stack.dim)
        shapes[f"{p}.attention.wo.weight"] = (stack.dim, stack.n_head * stack.head_dim)
        if stack.qk_norm:
            shapes[f"{p}.attention.q_norm.weight"] = (stack.head_dim,)
            shapes[f"{p}.attention.k_norm.weight"] = (stack.head_dim,)
        shapes[f"{p}.attention_norm.weight"] = (stack.dim,)
        shapes[f"{p}.ffn_norm.weight"] = (stack.dim,)
        shapes[f"{p}.feed_forward.w1.weight"] = (stack.intermediate_size, stack.dim)
        shapes[f"{p}.feed_forward.w3.weight"] = (stack.intermediate_size, stack.dim)
        shapes[f"{p}.feed_forward.w2.weight"] = (stack.dim, stack.intermediate_size)
    return shapes


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter the runtime needs, by runtime key, with its shape (the tied head has no tensor).

    Ordered as the released files are: the slow AR (`text_model.*`) first, then the fast AR (`audio_decoder.*`).
    """
    fast = config.fast
    return {
        "embeddings.weight": (config.vocab_size, config.dim),
        **_stack_shapes("layers", config.slow),
        "norm.weight": (config.dim,),
        "codebook_embeddings.weight": (config.codebook_size * config.num_codebooks, config.dim),
        "fast_embeddings.weight": (config.codebook_size, fast.dim),
        **_stack_shapes("fast_layers", fast),
        "fast_norm.weight": (fast.dim,),
        "fast_output.weight": (config.codebook_size, fast.dim),
    }


@dataclass
class Checkpoint:
    """A checkpoint folder, its config and a lazy view of its tensors by runtime key."""

    folder: Path
    config: ModelConfig
    tensors: dict[str, TensorEntry]  # runtime key -> where it lives
    shards: list[Path]
    metadata: dict[str, str]

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / "tokenizer.json"

    def read(self, key: str, staging: CudaStaging | None = None) -> torch.Tensor:
        """The tensor `key` on the CPU, or with `staging` on its GPU."""
        return read_tensor(self.tensors[key], staging)

    def iter_tensors(self, keys: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (runtime key, CPU tensor) one at a time, in file order so reads are sequential."""
        keys = list(self.tensors) if keys is None else keys
        for key in sorted(keys, key=lambda k: (str(self.tensors[k].file), self.tensors[k].start)):
            yield key, self.read(key)

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())


def _shard_files(folder: Path) -> list[Path]:
    index_path = folder / INDEX_NAME
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise CheckpointError(f"{index_path}: corrupt index (no weight_map)") from None
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise CheckpointError(f"{folder}: shard {missing[0]} listed in {INDEX_NAME} is missing")
        return [folder / n for n in names]
    if (folder / SINGLE_NAME).exists():
        return [folder / SINGLE_NAME]
    raise CheckpointError(f"{folder}: no {INDEX_NAME} or {SINGLE_NAME} (is this an S2 Pro checkpoint folder?)")


def open_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """Locate files, parse config and shard headers, remap keys. Reads no tensor data."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    config = load_config(folder / "config.json")
    shards = _shard_files(folder)
    tensors: dict[str, TensorEntry] = {}
    metadata: dict[str, str] = {}
    for shard in shards:
        entries, meta = read_safetensors_header(shard)
        metadata.update(meta)
        for key, entry in entries.items():
            if key.startswith("_buf."):  # module buffers saved by some conversions: derived, never loaded
                continue
            tensors[remap_key(key)] = entry
    return Checkpoint(folder, config, tensors, shards, metadata)


def validate(checkpoint: Checkpoint, allow_extra_suffixes: tuple[str, ...] = ()) -> None:
    """Check every expected tensor is present with its shape and a floating dtype; name the first offender.

    `allow_extra_suffixes` lets a quantized layout (e.g. `.scale` of s2-pro-fp8) pass its extra tensors.
    """
    expected = expected_shapes(checkpoint.config)
    for key, shape in expected.items():
        entry = checkpoint.tensors.get(key)
        if entry is None:
            raise CheckpointError(f"{checkpoint.folder}: tensor '{key}' is missing from the checkpoint")
        if entry.shape != shape:
            raise CheckpointError(
                f"tensor '{key}' in {entry.file.name} has shape {list(entry.shape)}, expected {list(shape)} "
                "from config.json"
            )
        if not entry.dtype.is_floating_point:
            raise CheckpointError(f"tensor '{key}' in {entry.file.name} has dtype {entry.dtype}, expected float")
    extra = [
        k
        for k in checkpoint.tensors
        if k not in expected and not (allow_extra_suffixes and k.endswith(allow_extra_suffixes))
    ]
    if extra:
        raise CheckpointError(f"{checkpoint.folder}: unexpected tensor '{extra[0]}' (not part of S2 Pro)")
