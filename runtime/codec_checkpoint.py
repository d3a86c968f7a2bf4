"""Reading the codec's checkpoint into our modules: the official key layout (derived from the modules and
their weight-norm tags), memory-mapped reading of codec.pth, and filling parameters with weight norm folded.

Model-agnostic: works on any module tree whose weight-normed convolutions are tagged by `weight_normed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from runtime.codec_layers import WeightNormStyle, fold_weight_norm
from runtime.errors import CheckpointError


def _weight_norm_keys(prefix: str, style: str) -> tuple[str, str]:
    if style == "parametrized":
        return f"{prefix}.parametrizations.weight.original0", f"{prefix}.parametrizations.weight.original1"
    return f"{prefix}.weight_g", f"{prefix}.weight_v"


@dataclass(frozen=True)
class LayoutEntry:
    """One tensor of the official checkpoint: which module parameter it makes, and how."""

    key: str
    shape: torch.Size
    param: str  # the module's parameter name
    part: str  # "tensor" (stored as is), "g" or "v" (weight-norm pair, folded into the weight)


def checkpoint_entries(model: nn.Module, style: WeightNormStyle | None = None) -> list[LayoutEntry]:
    """The checkpoint tensors `model` needs, in the official file's order (a weight-normed conv stores
    bias, then g, then v). `style` overrides the official weight-norm style of every normed conv."""
    entries = []
    for prefix, module in model.named_modules():
        module_style = getattr(module, "weight_norm_style", None)
        for name, param in module.named_parameters(recurse=False):
            if not (module_style and name == "weight"):
                entries.append(LayoutEntry(f"{prefix}.{name}", param.shape, f"{prefix}.{name}", "tensor"))
        if module_style:
            g_key, v_key = _weight_norm_keys(prefix, style or module_style)
            shape = module.weight.shape
            entries.append(LayoutEntry(g_key, torch.Size([shape[0], 1, 1]), f"{prefix}.weight", "g"))
            entries.append(LayoutEntry(v_key, shape, f"{prefix}.weight", "v"))
    return entries


def checkpoint_layout(model: nn.Module) -> dict[str, torch.Size]:
    """Official checkpoint key -> shape for every tensor `model` needs, in file order."""
    return {e.key: e.shape for e in checkpoint_entries(model)}


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a codec.pth, memory-mapped, with any `state_dict` wrapper and `generator.` prefix removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"codec checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read codec checkpoint {path}: {reason}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"codec checkpoint {path} does not hold a state dict")
    return {k.removeprefix("generator."): v for k, v in obj.items() if isinstance(v, Tensor)}


def _tensor(tensors: Mapping[str, Tensor], key: str, shape: torch.Size, path: Path) -> Tensor:
    if key not in tensors:
        raise CheckpointError(f"codec checkpoint {path} lacks tensor '{key}' (is it the S2 Pro codec.pth?)")
    t = tensors[key]
    if t.shape != shape or not t.is_floating_point():
        raise CheckpointError(f"codec checkpoint {path}: tensor '{key}' is {list(t.shape)} "
                              f"{str(t.dtype).removeprefix('torch.')}, expected {list(shape)} float")
    return t


def _folded_weight(tensors: Mapping[str, Tensor], prefix: str, style: str, shape: torch.Size, path: Path) -> Tensor:
    """A weight-normed conv's weight from either weight-norm style (or already folded)."""
    g_shape = torch.Size([shape[0], 1, 1])
    for candidate in ("parametrized", "legacy"):
        g_key, v_key = _weight_norm_keys(prefix, candidate)
        if g_key in tensors or v_key in tensors:
            return fold_weight_norm(_tensor(tensors, g_key, g_shape, path), _tensor(tensors, v_key, shape, path))
    if f"{prefix}.weight" in tensors:
        return _tensor(tensors, f"{prefix}.weight", shape, path)
    return _tensor(tensors, _weight_norm_keys(prefix, style)[1], shape, path)  # raises, naming the key


def load_parameters(model: nn.Module, tensors: Mapping[str, Tensor], path: Path,
                    device: torch.device, dtype: torch.dtype) -> None:
    """Fill every parameter of `model` still on the meta device from `tensors`, one tensor at a time."""
    loaded: dict[str, Tensor] = {}
    for prefix, module in model.named_modules():
        style = getattr(module, "weight_norm_style", None)
        for name, param in module.named_parameters(recurse=False):
            if not param.is_meta:
                continue
            key = f"{prefix}.{name}"
            t = (_folded_weight(tensors, prefix, style, param.shape, path) if style and name == "weight"
                 else _tensor(tensors, key, param.shape, path))
            loaded[key] = t.to(device=device, dtype=dtype).contiguous()
    model.load_state_dict(loaded, strict=False, assign=True)
    model.requires_grad_(False)
