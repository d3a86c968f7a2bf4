"""Building the Dual-AR from a checkpoint folder, one tensor at a time.

The model is constructed on the meta device (no memory), then every parameter is read from disk, converted and
moved to its device, and assigned in place: peak memory is the final model plus one tensor in flight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from runtime.checkpoint import Checkpoint, open_checkpoint, validate
from runtime.config import ModelConfig
from runtime.errors import CheckpointError, InputError, ResourceError
from runtime.model import DualAR
from runtime.tokenizer import Tokenizer

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: DualAR
    tokenizer: Tokenizer
    checkpoint: Checkpoint

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def resolve_device(name: str) -> torch.device:
    """'auto' -> the first CUDA GPU if there is one, else the CPU; refuse a CUDA request without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ResourceError(f"device '{name}' requested but no CUDA GPU is available")
    return device


def reconcile_tokenizer(config: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """Take the semantic range from the tokenizer (as the reference does) after checking it agrees with config."""
    ids = tokenizer.ids
    if ids.im_end != config.im_end_id:
        raise CheckpointError(f"tokenizer.json has <|im_end|> = {ids.im_end} but config.json says {config.im_end_id}")
    if (ids.semantic_begin, ids.semantic_end) != (config.semantic_begin_id, config.semantic_end_id):
        raise CheckpointError(
            f"tokenizer.json semantic ids {ids.semantic_begin}..{ids.semantic_end} disagree with config.json "
            f"{config.semantic_begin_id}..{config.semantic_end_id}"
        )
    if ids.semantic_end >= config.vocab_size:
        raise CheckpointError(f"tokenizer ids reach {ids.semantic_end}, beyond vocab_size {config.vocab_size}")
    return config.with_semantic_ids(ids.semantic_begin, ids.semantic_end)


def assign_parameter(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Replace the (meta) parameter at `key` with `tensor`, which becomes the storage (no copy)."""
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[name] = nn.Parameter(tensor, requires_grad=False)


def load_model(
    folder: str | os.PathLike,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    on_tensor: Callable[[str, int], None] | None = None,
) -> LoadedModel:
    """Open, validate and load a checkpoint. `on_tensor(key, nbytes)` reports progress per tensor read."""
    checkpoint = open_checkpoint(folder)
    validate(checkpoint)
    tokenizer = Tokenizer(checkpoint.tokenizer_path)
    config = reconcile_tokenizer(checkpoint.config, tokenizer)
    with torch.device("meta"):
        model = DualAR(config)
    model.legal_ids = model.legal_ids.to(device)
    try:
        for key, tensor in checkpoint.iter_tensors():
            assign_parameter(model, key, tensor.to(device=device, dtype=dtype))
            if on_tensor is not None:
                on_tensor(key, checkpoint.tensors[key].nbytes)
        model.build_head()
    except torch.OutOfMemoryError:
        raise ResourceError(
            f"out of GPU memory loading the model in {dtype} on {device}: try a smaller precision"
        ) from None
    model.eval()
    return LoadedModel(model, tokenizer, checkpoint)
