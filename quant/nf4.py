"""NF4 weights through bitsandbytes: quant_type "nf4", blocks of 64, double quantization on (about 4.13 bits).

The stored form is bitsandbytes' own, so files interoperate with `Linear4bit` / `Params4bit.from_prequantized`:
`weight` (packed uint8 [ceil(n/2), 1]), `weight.absmax` (uint8, the double-quantized block scales),
`weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`
(uint8 JSON: shape, dtype, blocksizes, offset).

For compute, the double quantization is undone once at load: one scale per block of 64, kept in fp16 (half the
bytes of fp32, 2^-11 relative rounding, far below NF4's own error) unless the scales fall outside fp16's normal
range, then fp32. The packed bytes are used as they are; the tensors only needed to write the stored form back
stay on the CPU. Without double quantization (no `nested_*` tensors) the file loads as well.

Loading reads the quant state and undoes the double quantization itself (the same fp32 products as
bitsandbytes' dequantize_blockwise, bit for bit): importing bitsandbytes takes about 2 s (it pulls in sympy and
torch._dynamo), which every start-up from a pre-quantized store would otherwise pay. Quantizing still uses it.
"""

from __future__ import annotations

import json
from typing import Callable, Mapping, Self

import torch
from torch import Tensor

from quant.base import QuantizedLinear, require
from quant.kernels import kernels_supported
from runtime.errors import CheckpointError

BLOCKSIZE = 64
_COMPUTE_KEYS = ("weight", "weight.quant_map")  # the other stored tensors are kept only to be written back


def _bnb_functional():
    import bitsandbytes.functional  # imported on first use: slow, and noisy on machines without its kernels

    return bitsandbytes.functional


def _quant_state(packed: Tensor) -> dict:
    """bitsandbytes' packed quant state: the JSON of its non-tensor items as uint8 bytes."""
    try:
        state = json.loads(bytes(packed.cpu().numpy()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"nf4 layer: unreadable bitsandbytes quant state ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("blocksize"), int) or state["blocksize"] < 1:
        raise CheckpointError(f"nf4 layer: unreadable bitsandbytes quant state ({state!r:.80})")
    return state


def _block_scales(tensors: Mapping[str, Tensor], state: dict, device: torch.device) -> Tensor:
    """One fp32 scale per block: `weight.absmax` as stored, or with double quantization its uint8 codes through
    `nested_quant_map`, times the scale of their block of `nested_blocksize`, plus `nested_offset`."""
    absmax = tensors["weight.absmax"].to(device)
    if "weight.nested_absmax" not in tensors:
        return absmax.float()
    nested, code = tensors["weight.nested_absmax"].to(device), tensors.get("weight.nested_quant_map")
    blocksize = state.get("nested_blocksize")
    if (absmax.dtype != torch.uint8 or code is None or code.numel() != 256 or not isinstance(blocksize, int)
            or blocksize < 1 or nested.numel() != -(-absmax.numel() // blocksize) or "nested_offset" not in state):
        raise CheckpointError("nf4 layer: inconsistent double quantization (absmax, nested_absmax, nested_quant_map)")
    block = torch.arange(absmax.numel(), device=device) // blocksize
    offset = torch.tensor(float(state["nested_offset"]), dtype=torch.float32)
    return code.to(device, torch.float32)[absmax.long()] * nested.float()[block] + offset.to(device)


def _compute_scales(absmax: Tensor) -> Tensor:
    """fp16 when every nonzero scale is a normal fp16 number, else fp32 (exact)."""
    mags = absmax.abs()
    nonzero = mags[mags > 0]
    fits = nonzero.numel() == 0 or (nonzero.min() >= 2.0**-14 and nonzero.max() <= 65504.0)
    return absmax.half() if fits else absmax.float()


class NF4Linear(QuantizedLinear):
    format = "nf4"

    def __init__(self, out_features: int, in_features: int, packed: Tensor, absmax: Tensor, code: Tensor,
                 blocksize: int, stored_only: dict[str, Tensor]) -> None:
        super().__init__(out_features, in_features)
        self.blocksize = blocksize
        self.register_buffer("weight", packed)  # [ceil(out*in/2), 1] uint8, bitsandbytes' layout
        self.register_buffer("absmax", absmax)  # [n_blocks] fp16/fp32, double quantization undone
        self.register_buffer("code", code)  # [16] fp32, the NF4 values (bitsandbytes' quant_map)
        self._stored_only = stored_only
        self._code_values = tuple(code.tolist())  # compared without a device sync: layers gated together share it

    @classmethod
    def from_float(cls, weight: Tensor) -> Self:
        if weight.ndim != 2 or not weight.is_floating_point():
            raise ValueError(f"expected a float weight [out, in], got {weight.dtype} {tuple(weight.shape)}")
        packed, state = _bnb_functional().quantize_4bit(
            weight.contiguous(), blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"
        )
        tensors = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
        return cls.from_stored(tensors)

    @classmethod
    def from_stored(cls, tensors: Mapping[str, Tensor]) -> Self:
        require(tensors, "nf4", {"weight": torch.uint8, "weight.quant_map": torch.float32, "weight.absmax": None,
                                 "weight.quant_state.bitsandbytes__nf4": torch.uint8})
        packed = tensors["weight"]
        state = _quant_state(tensors["weight.quant_state.bitsandbytes__nf4"])
        shape = state.get("shape")
        if state.get("quant_type") != "nf4" or not isinstance(shape, list) or len(shape) != 2:
            raise CheckpointError(f"nf4 layer: quant state says {state.get('quant_type')} {shape}, expected nf4 2-D")
        out_features, in_features = shape
        if packed.numel() != (out_features * in_features + 1) // 2:
            raise CheckpointError(f"nf4 layer: {packed.numel()} packed bytes for a {out_features}x{in_features} weight")
        absmax = _block_scales(tensors, state, packed.device)
        stored_only = {key: t.cpu() for key, t in tensors.items() if key not in _COMPUTE_KEYS}
        return cls(out_features, in_features, packed.reshape(-1, 1), _compute_scales(absmax),
                   tensors["weight.quant_map"].to(packed.device), state["blocksize"], stored_only)

    def stored_tensors(self) -> dict[str, Tensor]:
        return {"weight": self.weight, "weight.quant_map": self.code, **self._stored_only}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        shape = torch.Size((self.out_features, self.in_features))
        if self.weight.is_cuda and kernels_supported(self.weight.device) and self.blocksize % 2 == 0:
            from quant.kernels.dequant_nf4 import dequant_nf4

            return dequant_nf4(self.weight, self.absmax, self.code, self.blocksize, shape, dtype)
        bnbf = _bnb_functional()
        state = bnbf.QuantState(absmax=self.absmax.float(), shape=shape, code=self.code, blocksize=self.blocksize,
                                quant_type="nf4", dtype=dtype)
        return bnbf.dequantize_4bit(self.weight, state)

    def gemv_applies(self, x: Tensor) -> bool:
        if not super().gemv_applies(x):
            return False
        from quant.kernels.gemv_nf4 import kernel_accepts

        return kernel_accepts(self.in_features, self.blocksize)

    @classmethod
    def ahead_calls(cls, out_features: int, in_features: int, x_dtype: torch.dtype, device: torch.device,
                    gated: bool = False) -> list[Callable[[], object]]:
        """As QuantizedLinear.ahead_calls, for fp16 block scales (those of any weight with normal-range scales)."""
        from quant.kernels.gemv_nf4 import ahead_calls, kernel_accepts

        if not kernel_accepts(in_features, BLOCKSIZE):
            return []
        return ahead_calls(out_features, in_features, BLOCKSIZE, torch.float16, x_dtype, device, gated)

    @classmethod
    def prefill_ahead_calls(cls, x_dtype: torch.dtype, device: torch.device) -> list[Callable[[], object]]:
        """The dequantization of a stand-in layer with fp16 block scales: its kernel compiles once for all shapes."""
        def dequantize() -> Tensor:
            packed = torch.zeros(BLOCKSIZE, 1, dtype=torch.uint8, device=device)  # one row of 2 * BLOCKSIZE
            scales = torch.ones(2, dtype=torch.float16, device=device)
            return cls(1, 2 * BLOCKSIZE, packed, scales, torch.zeros(16, device=device), BLOCKSIZE,
                       {}).dequantize(x_dtype)

        return [dequantize]

    def gemv(self, x: Tensor) -> Tensor:
        from quant.kernels.gemv_nf4 import gemv_nf4

        return gemv_nf4(x, *self._rows(), self.code, self.blocksize)

    def gated_gemv(self, up: Self, x: Tensor) -> Tensor | None:
        from quant.kernels.gemv_nf4 import gemv_nf4_gated

        if up.blocksize != self.blocksize or up._code_values != self._code_values:
            return None
        return gemv_nf4_gated(x, self._rows(), up._rows(), self.code, self.blocksize)

    def _rows(self) -> tuple[Tensor, Tensor]:
        """The packed weight [out, in/2] and the block scales [out, in/blocksize], as the kernels read them."""
        rows, cols = self.out_features, self.in_features
        return self.weight.view(rows, cols // 2), self.absmax.view(rows, cols // self.blocksize)
