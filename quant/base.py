"""The interface every quantized linear meets, the format registry, and the per-layer accuracy check.

A quantized linear is a drop-in replacement for `nn.Linear(in, out, bias=False)` holding a weight [out, in]:
model code keeps plain `nn.Linear` modules and a precision mode swaps them (torchao's `quantize_` idea, one call
per layer: `quantize_linear(weight, "nf4")`). Each format has a stored form of plain tensors (safetensors can
hold them; keys are suffixes under the module name such as "weight", "weight.scale") and a reference float
weight (`dequantize()`) that every fast path is checked against.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.errors import CheckpointError, InputError

# Format name -> "module:Class". Imported on first use so that choosing fp8 never imports bitsandbytes.
FORMATS: dict[str, str] = {
    "nf4": "quant.nf4:NF4Linear",
    "fp8": "quant.fp8:FP8Linear",
    "int8": "quant.int8:Int8Linear",
}


class QuantizedLinear(nn.Module, ABC):
    """`y = x @ W.T` with W held in a quantized format; `forward` returns x's dtype.

    Subclasses store their tensors as buffers (so `.to(device)` moves them) and implement the five methods
    below. `forward` runs the format's batch-1 GEMV kernel when x holds one token on a CUDA device, and
    otherwise multiplies by the dequantized weight (prefill, CPU, and cards the kernels do not support).
    """

    format: ClassVar[str]

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features

    @classmethod
    @abstractmethod
    def from_float(cls, weight: Tensor) -> Self:
        """Quantize a float weight [out, in] (on its device)."""

    @classmethod
    @abstractmethod
    def from_stored(cls, tensors: Mapping[str, Tensor]) -> Self:
        """Rebuild from `stored_tensors()` output (or a file in the same layout), bit-exactly."""

    @abstractmethod
    def stored_tensors(self) -> dict[str, Tensor]:
        """Plain tensors to persist, keyed by suffix under the module name ("weight", "weight.scale", ...)."""

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The reference float weight [out, in], computed in fp32 and rounded once to `dtype`."""

    @abstractmethod
    def gemv(self, x: Tensor) -> Tensor:
        """One token on CUDA through our Triton kernel: x [in] -> y [out] in x's dtype."""

    def gated_gemv(self, up: Self, x: Tensor) -> Tensor | None:
        """SiLU(x @ W.T) * (x @ up's W.T) for one token x [in] in one kernel launch, where the format's kernel has a
        gated form and `up` is laid out like this layer; None otherwise (the caller runs the two layers)."""
        return None

    @classmethod
    def ahead_calls(cls, out_features: int, in_features: int, x_dtype: torch.dtype, device: torch.device,
                    gated: bool = False) -> list[Callable[[], object]]:
        """Calls that compile, each on small stand-in tensors, the kernels the first one-token forward of such a
        layer times (gated: its gated form with an up layer alike), so that they can compile in threads while
        the weights load (runtime/compile_ahead.py). No calls by default."""
        return []

    @classmethod
    def prefill_ahead_calls(cls, x_dtype: torch.dtype, device: torch.device) -> list[Callable[[], object]]:
        """As ahead_calls, for the kernels the first multi-token forward (a prefill) of any layer of this class
        compiles. No calls by default."""
        return []

    def gemv_applies(self, x: Tensor) -> bool:
        """Whether `forward(x)` takes the kernel path: one token, CUDA, Triton present, format-specific limits."""
        from quant.kernels import kernels_supported

        return x.is_cuda and x.numel() == self.in_features and kernels_supported(x.device)

    def forward(self, x: Tensor) -> Tensor:
        # The first kernel call per (shape, dtype) times the kernel's candidates, which synchronizes: call once
        # before CUDA-graph capture.
        if self.gemv_applies(x):
            return self.gemv(x.reshape(-1)).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantize(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


class RowScaledLinear(QuantizedLinear):
    """8-bit weight [out, in] times one fp32 scale per output row: `weight` + `weight.scale` [out, 1].

    Shared by FP8 and INT8, which differ only in element type, largest code (`qmax`) and rounding (`_encode`).
    The scale is row absmax / qmax; an all-zero row gets scale 0 and zero codes, so it dequantizes to 0.
    """

    element_dtype: ClassVar[torch.dtype]
    qmax: ClassVar[float]

    def __init__(self, weight: Tensor, scale: Tensor) -> None:
        super().__init__(*weight.shape)
        self.register_buffer("weight", weight)  # [out, in] element_dtype
        self.register_buffer("scale", scale)  # [out, 1] fp32

    @staticmethod
    @abstractmethod
    def _encode(scaled: Tensor) -> Tensor:
        """fp32 values in [-qmax, qmax] -> element_dtype codes."""

    @classmethod
    def from_float(cls, weight: Tensor) -> Self:
        if weight.ndim != 2 or not weight.is_floating_point():
            raise ValueError(f"expected a float weight [out, in], got {weight.dtype} {tuple(weight.shape)}")
        scale = weight.abs().amax(dim=1, keepdim=True).float() / cls.qmax  # [out, 1]
        if not torch.isfinite(scale).all():
            raise CheckpointError(f"weight {tuple(weight.shape)} holds inf or NaN values: the checkpoint is corrupt")
        codes = cls._encode(weight / torch.where(scale > 0, scale, 1.0))  # bf16 / fp32 -> fp32 division
        return cls(codes, scale)

    @classmethod
    def from_stored(cls, tensors: Mapping[str, Tensor]) -> Self:
        require(tensors, cls.format, {"weight": cls.element_dtype, "weight.scale": torch.float32})
        weight, scale = tensors["weight"], tensors["weight.scale"]
        if weight.ndim != 2 or tuple(scale.shape) != (weight.shape[0], 1):
            raise CheckpointError(
                f"{cls.format} layer: weight {tuple(weight.shape)} with scale {tuple(scale.shape)}, "
                f"expected [out, in] with [out, 1]"
            )
        return cls(weight.contiguous(), scale.contiguous())

    def stored_tensors(self) -> dict[str, Tensor]:
        return {"weight": self.weight, "weight.scale": self.scale}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.weight.float() * self.scale).to(dtype)

    @classmethod
    def ahead_calls(cls, out_features: int, in_features: int, x_dtype: torch.dtype, device: torch.device,
                    gated: bool = False) -> list[Callable[[], object]]:
        from quant.kernels.gemv8 import ahead_calls

        return ahead_calls(out_features, in_features, cls.element_dtype, x_dtype, device, gated)

    def gemv(self, x: Tensor) -> Tensor:
        from quant.kernels.gemv8 import gemv8

        return gemv8(x, self.weight, self.scale)

    def gated_gemv(self, up: Self, x: Tensor) -> Tensor | None:
        from quant.kernels.gemv8 import gemv8

        return gemv8(x, self.weight, self.scale, up=(up.weight, up.scale))


class FloatLinear(nn.Linear):
    """`nn.Linear` whose forward for one token on CUDA with bf16 / fp16 weights runs our batch-1 GEMV: 1.15-1.49x
    faster than cuBLAS on S2's shapes on an H100 (benchmarks/results/gemv-*.md), and the first call per shape keeps
    cuBLAS where it is quicker. Same parameters and state dict as `nn.Linear`; everything else goes to it."""

    def gemv_applies(self, x: Tensor) -> bool:
        from quant.kernels import kernels_supported

        return (x.is_cuda and x.numel() == self.in_features and self.bias is None and x.dtype == self.weight.dtype
                and x.dtype in (torch.bfloat16, torch.float16) and kernels_supported(x.device))

    @classmethod
    def ahead_calls(cls, out_features: int, in_features: int, x_dtype: torch.dtype, device: torch.device,
                    gated: bool = False) -> list[Callable[[], object]]:
        """As QuantizedLinear.ahead_calls, for weights of x's dtype (the only ones the kernels take)."""
        if x_dtype not in (torch.bfloat16, torch.float16):
            return []
        from quant.kernels.gemv8 import ahead_calls

        return ahead_calls(out_features, in_features, x_dtype, x_dtype, device, gated)

    def forward(self, x: Tensor) -> Tensor:
        if self.gemv_applies(x):  # the first call per shape times the candidates (a sync): before graph capture
            from quant.kernels.gemv8 import gemv_float

            return gemv_float(x.reshape(-1), self.weight).view(*x.shape[:-1], self.out_features)
        return super().forward(x)

    def gated_gemv(self, up: Self, x: Tensor) -> Tensor | None:
        """As QuantizedLinear.gated_gemv: SiLU(x @ W.T) * (x @ up's W.T) in one launch, None where `up` differs."""
        if not up.gemv_applies(x):
            return None
        from quant.kernels.gemv8 import gemv_float

        return gemv_float(x, self.weight, up=up.weight)


def silu_gated(gate: nn.Module, up: nn.Module, x: Tensor) -> Tensor | None:
    """An FFN's SiLU(gate(x)) * up(x) as one kernel launch: both layers quantized alike (or both float), x one token
    where the kernels run. None elsewhere (prefill, CPU, mixed layers): the caller runs the two layers and the
    product."""
    if not (isinstance(gate, (QuantizedLinear, FloatLinear)) and type(up) is type(gate) and gate.gemv_applies(x)
            and (up.out_features, up.in_features) == (gate.out_features, gate.in_features)):
        return None
    y = gate.gated_gemv(up, x.reshape(-1))
    return None if y is None else y.view(*x.shape[:-1], gate.out_features)


def format_class(fmt: str) -> type[QuantizedLinear]:
    """The class registered for a format name ("nf4", "fp8", "int8")."""
    if fmt not in FORMATS:
        raise InputError(f"unknown weight format '{fmt}' (choose one of {', '.join(FORMATS)})")
    module_name, _, class_name = FORMATS[fmt].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def quantize_linear(weight: Tensor, fmt: str) -> QuantizedLinear:
    """The one entry point of a precision mode: a float weight [out, in] -> the quantized drop-in module."""
    return format_class(fmt).from_float(weight)


def load_linear(fmt: str, tensors: Mapping[str, Tensor]) -> QuantizedLinear:
    """Rebuild a quantized linear from its stored tensors (a pre-quantized store or a community checkpoint)."""
    return format_class(fmt).from_stored(tensors)


def swap_linears(root: nn.Module, choose: Callable[[str, nn.Linear], str | None]) -> list[str]:
    """Replace each `nn.Linear` under `root` for which `choose(name, linear)` names a format; return their names.

    Only bias-free layers can be swapped (S2 has no linear biases); the replaced float weight is released.
    """
    swapped = []
    for name, module in list(root.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        fmt = choose(name, module)
        if fmt is None:
            continue
        if module.bias is not None:
            raise InputError(f"{name}: quantized linears have no bias, but this layer has one")
        parent_name, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent_name), attr, quantize_linear(module.weight.detach(), fmt))
        swapped.append(name)
    return swapped


def require(tensors: Mapping[str, Tensor], fmt: str, spec: Mapping[str, torch.dtype | None]) -> None:
    """Check that stored tensors have the keys and dtypes a format needs (None: any dtype); one clear error."""
    missing = [key for key in spec if key not in tensors]
    if missing:
        raise CheckpointError(f"{fmt} layer is missing stored tensors: {', '.join(missing)}")
    for key, dtype in spec.items():
        if dtype is not None and tensors[key].dtype != dtype:
            raise CheckpointError(f"{fmt} layer: '{key}' is {tensors[key].dtype}, expected {dtype}")


@dataclass(frozen=True)
class ErrorStats:
    """Tier-0 comparison of a layer output with its reference (quality-protocol.md)."""

    rel_fro: float  # ||y - ref||_F / ||ref||_F
    cosine: float  # cosine similarity of the flattened outputs

    def ok(self, max_rel: float = 1e-2, min_cos: float = 0.9999) -> bool:
        return self.rel_fro <= max_rel and self.cosine >= min_cos


def reference_output(x: Tensor, layer: QuantizedLinear) -> Tensor:
    """`x.float() @ dequant.float().T`: the output the layer must reproduce, in fp32 on x's device."""
    return x.float() @ layer.dequantize(torch.float32).to(x.device).T


def error_stats(y: Tensor, ref: Tensor) -> ErrorStats:
    """Relative Frobenius error and cosine of `y` against `ref`, both computed in fp64."""
    y, ref = y.detach().double().flatten(), ref.detach().double().flatten()
    rel = (y - ref).norm() / ref.norm().clamp_min(1e-300)
    cos = F.cosine_similarity(y, ref, dim=0, eps=1e-300)
    return ErrorStats(float(rel), float(cos))
