"""Building the Dual-AR from a checkpoint folder, one tensor at a time.

The model is constructed on the meta device (no memory), then every parameter is read from disk, converted and
moved to its device, and assigned in place. A linear layer whose plan names a quantized format is quantized on
the device right after its bf16 weight arrives, and the bf16 copy is dropped: peak memory is the final model plus
one bf16 layer in flight plus the quantizer's scratch. Linears stored as float8 with a `.scale` (the community
`s2-pro-fp8` layout) load as FP8 layers as they are. Quantized layers can be saved to a pre-quantized store and
reloaded from it on later starts without touching the bf16 weights.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from quant.base import FORMATS, FloatLinear, QuantizedLinear, format_class, load_linear, quantize_linear
from quant.store import StaleStoreError, load_store, save_store
from runtime.checkpoint import Checkpoint, open_checkpoint, validate
from runtime.compile_ahead import compiling_ahead
from runtime.config import ModelConfig
from runtime.errors import CheckpointError, InputError, ResourceError
from runtime.files import file_fingerprint
from runtime.meta import meta_device
from runtime.model import DualAR
from runtime.safetensors_io import cuda_staging
from runtime.sampling import SamplingParams
from runtime.tokenizer import Tokenizer

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
SCALE_SUFFIX = ".scale"  # s2-pro-fp8: `<linear>.weight.scale` float32 [out, 1]


@dataclass(frozen=True)
class WeightFormats:
    """Format of the slow-AR and fast-AR linear layers: "bf16"/"fp32" keep them float, or "fp8", "int8", "nf4"."""

    slow: str = "bf16"
    fast: str = "bf16"

    @property
    def quantized(self) -> bool:
        return self.slow in FORMATS or self.fast in FORMATS


def linear_format(key: str, formats: WeightFormats) -> str | None:
    """The quantized format for a runtime key if it is the weight of a linear the plan quantizes, else None."""
    if not key.endswith(".weight") or "norm" in key or "embeddings" in key:
        return None
    fmt = formats.fast if key.startswith("fast_") else formats.slow
    return fmt if fmt in FORMATS else None


def source_hashes(checkpoint: Checkpoint) -> dict[str, str]:
    """A cheap fingerprint per shard (size, mtime and header digest): rebuild the store when a shard changes."""
    return {shard.name: file_fingerprint(shard) for shard in checkpoint.shards}


@dataclass
class LoadedModel:
    model: DualAR
    tokenizer: Tokenizer
    checkpoint: Checkpoint
    warnings: tuple[str, ...] = ()  # what went wrong without stopping the load (the store could not be saved)

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


def replace_linear(model: nn.Module, weight_key: str, layer: QuantizedLinear) -> None:
    parent, _, attr = weight_key.removesuffix(".weight").rpartition(".")
    setattr(model.get_submodule(parent), attr, layer)


def quantized_modules(model: nn.Module) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    return {name: (m.format, m.stored_tensors()) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


DEFAULT_CACHE_DIR = Path.home() / ".cache" / "s2edge"  # --cache-dir, S2EDGE_CACHE: quantized weights and more


def store_path(cache_dir: Path, checkpoint: Path, formats: WeightFormats) -> Path:
    """Where the pre-quantized weights of `checkpoint` in `formats` are kept: one name for every command."""
    return cache_dir / f"{checkpoint.resolve().name}-{formats.slow}-{formats.fast}.safetensors"


def layer_class(checkpoint: Checkpoint, formats: WeightFormats, key: str) -> type[FloatLinear | QuantizedLinear]:
    """The class loading gives the linear whose weight is `key`: FP8 for a float8 tensor (s2-pro-fp8), the plan's
    format, or FloatLinear where the plan keeps it float."""
    if checkpoint.tensors[key].dtype == torch.float8_e4m3fn:
        return format_class("fp8")
    fmt = linear_format(key, formats)
    return FloatLinear if fmt is None else format_class(fmt)


def fill_model(model: DualAR, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype,
               on_tensor: Callable[[str, int], None] | None, formats: WeightFormats, store: Path | None,
               embeddings_on_host: bool) -> list[str]:
    """Read every tensor of `checkpoint` into `model` (built on the meta device) as load_model says, reusing the
    store or writing it; the warnings."""
    hashes = source_hashes(checkpoint) if store is not None and formats.quantized else {}
    stored: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    staging = cuda_staging(device)  # reads straight into GPU memory
    if hashes:
        try:
            stored, _ = load_store(store, hashes, device, staging)
        except StaleStoreError:
            stored = {}
    try:
        for key in checkpoint.tensors:
            if key.endswith(SCALE_SUFFIX):
                continue
            entry = checkpoint.tensors[key]
            module_name = key.removesuffix(".weight")
            if module_name in stored:
                replace_linear(model, key, load_linear(*stored[module_name]))
            elif entry.dtype == torch.float8_e4m3fn:  # community s2-pro-fp8 layout: load as it is
                scale = checkpoint.read(key + SCALE_SUFFIX, staging).to(device)
                replace_linear(model, key, load_linear("fp8", {"weight": checkpoint.read(key, staging).to(device),
                                                               "weight.scale": scale}))
            elif (fmt := linear_format(key, formats)) is not None:
                weight = checkpoint.read(key, staging).to(device=device, dtype=torch.bfloat16)
                replace_linear(model, key, quantize_linear(weight, fmt))
                del weight
            elif embeddings_on_host and key == "embeddings.weight":
                assign_parameter(model, key, checkpoint.read(key).to(dtype=dtype))
            else:
                assign_parameter(model, key, checkpoint.read(key, staging).to(device=device, dtype=dtype))
            if on_tensor is not None:
                on_tensor(key, entry.nbytes)
        model.build_head()
    except torch.OutOfMemoryError:
        raise ResourceError(
            f"out of GPU memory loading the model ({formats.slow}, fast AR {formats.fast}) on {device}: "
            "try a smaller --precision or --max-context"
        ) from None
    warnings = []
    if hashes and not stored:
        try:
            save_store(store, quantized_modules(model), hashes, {"slow": formats.slow, "fast": formats.fast})
        except OSError as exc:  # a full disk or an unwritable cache folder costs the next run a quantization only
            warnings.append(f"could not save the quantized weights to {store} ({exc.strerror or exc}): the next run "
                            "quantizes them again (--cache-dir picks another folder)")
    return warnings


def load_model(
    folder: str | os.PathLike,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    on_tensor: Callable[[str, int], None] | None = None,
    formats: WeightFormats = WeightFormats(),
    store: Path | None = None,
    embeddings_on_host: bool = False,
    sampling: SamplingParams = SamplingParams(),
) -> LoadedModel:
    """Open, validate and load a checkpoint. `on_tensor(key, nbytes)` reports progress per tensor read.

    With quantized `formats` and a `store` path: reuse the store if it was made from these files, else quantize
    while loading and write the store for next time. `embeddings_on_host` keeps the text embedding table in host
    RAM (read at prefill only; the head's legal rows are copied to `device`). `sampling`: the settings the first
    request will draw with, whose kernel then compiles while loading (runtime/stand_in_frame.py).
    """
    checkpoint = open_checkpoint(folder)
    validate(checkpoint, allow_extra_suffixes=(SCALE_SUFFIX,))
    tokenizer = Tokenizer(checkpoint.tokenizer_path)
    config = reconcile_tokenizer(checkpoint.config, tokenizer)
    if formats.quantized and device.type != "cuda" and "nf4" in (formats.slow, formats.fast):
        raise ResourceError("nf4 needs a CUDA GPU (bitsandbytes); use bf16 or fp32 on the CPU")
    with meta_device():
        model = DualAR(config)
    model.legal_ids = model.legal_ids.to(device)
    with compiling_ahead(model, functools.partial(layer_class, checkpoint, formats), dtype, device, sampling):
        warnings = fill_model(model, checkpoint, device, dtype, on_tensor, formats, store, embeddings_on_host)
    model.eval()
    return LoadedModel(model, tokenizer, checkpoint, tuple(warnings))
