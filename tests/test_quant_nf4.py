"""NF4: the stored form is bitsandbytes' own, byte for byte, and reloads (here and in bitsandbytes)."""

from __future__ import annotations

import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from quant.base import load_linear, quantize_linear  # noqa: E402
from quant.nf4 import NF4Linear  # noqa: E402
from runtime.errors import CheckpointError  # noqa: E402


def _weight(out_f: int, in_f: int, scale: float = 0.02, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(out_f, in_f, generator=gen) * scale).bfloat16()


def _bnb_reference(weight: torch.Tensor):
    return bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")


def _bnb_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantization in fp32 (the state would round it to the source dtype)."""
    state.dtype = torch.float32
    return bnbf.dequantize_4bit(packed, state)


def test_stored_form_is_bitsandbytes_bytes():
    weight = _weight(2560, 4096)  # the wo shape
    packed, state = _bnb_reference(weight)
    stored = quantize_linear(weight, "nf4").stored_tensors()
    expected = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    assert set(stored) == set(expected)
    for key, tensor in expected.items():
        assert stored[key].dtype == tensor.dtype and torch.equal(stored[key].cpu(), tensor), key


def test_bytes_check_detects_one_flipped_nibble():
    """Negative control for the comparison above."""
    weight = _weight(64, 128)
    packed, _ = _bnb_reference(weight)
    stored = quantize_linear(weight, "nf4").stored_tensors()["weight"].clone()
    stored[17] ^= 0x10
    assert not torch.equal(stored, packed)


def test_compute_scales_are_fp16_rounded_bitsandbytes_scales():
    weight = _weight(256, 512)
    packed, state = _bnb_reference(weight)
    layer = quantize_linear(weight, "nf4")
    ref = _bnb_dequantize(packed, state)  # double quantization undone by bitsandbytes
    assert layer.absmax.dtype == torch.float16
    # |code * a16 - code * a32| <= |code * a32| * 2^-11 (fp16 rounding), plus fp32 product rounding.
    assert ((layer.dequantize() - ref).abs() <= ref.abs() * (2.0**-11 + 2.0**-22)).all()


def test_tiny_scales_stay_fp32_and_exact():
    weight = _weight(64, 256, scale=1e-6)  # block scales below fp16's normal range
    packed, state = _bnb_reference(weight)
    layer = quantize_linear(weight, "nf4")
    assert layer.absmax.dtype == torch.float32
    assert torch.equal(layer.dequantize(), _bnb_dequantize(packed, state))


def test_round_trip_is_bit_exact():
    layer = quantize_linear(_weight(128, 320), "nf4")  # 320: blocks do not align with tiles of 256
    again = load_linear("nf4", layer.stored_tensors())
    for key, tensor in layer.stored_tensors().items():
        assert torch.equal(again.stored_tensors()[key], tensor), key
    assert torch.equal(again.absmax, layer.absmax)
    x = torch.randn(3, 320).bfloat16()
    assert torch.equal(again(x), layer(x))


def test_bitsandbytes_loads_our_stored_form():
    from bitsandbytes.nn import Params4bit

    layer = quantize_linear(_weight(64, 256), "nf4")
    stored = layer.stored_tensors()
    param = Params4bit.from_prequantized(
        stored["weight"], {k: v for k, v in stored.items() if k != "weight"}, device="cpu"
    )
    assert param.quant_state.shape == (64, 256)
    deq = _bnb_dequantize(param.data, param.quant_state)
    assert ((layer.dequantize() - deq).abs() <= deq.abs() * (2.0**-11 + 2.0**-22)).all()


def test_odd_shapes_fall_back_correctly():
    """Blocks that span rows (in % 64 != 0) still dequantize like bitsandbytes."""
    weight = _weight(7, 90)
    packed, state = _bnb_reference(weight)
    layer = quantize_linear(weight, "nf4")
    ref = _bnb_dequantize(packed, state)
    assert ((layer.dequantize() - ref).abs() <= ref.abs() * (2.0**-11 + 2.0**-22)).all()


def test_rejects_broken_stored_tensors():
    stored = quantize_linear(_weight(64, 128), "nf4").stored_tensors()
    with pytest.raises(CheckpointError, match="missing"):
        NF4Linear.from_stored({k: v for k, v in stored.items() if k != "weight.absmax"})
    with pytest.raises(CheckpointError, match="packed bytes"):
        NF4Linear.from_stored({**stored, "weight": stored["weight"][:-2]})
    fp4, state = bnbf.quantize_4bit(_weight(64, 128), blocksize=64, compress_statistics=True, quant_type="fp4")
    with pytest.raises(CheckpointError, match="nf4"):
        NF4Linear.from_stored({"weight": fp4, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}})


@pytest.mark.parametrize("shape", [(7, 90), (128, 320), (2560, 4096)])
def test_loading_undoes_double_quantization_as_bitsandbytes(shape):
    """The block scales read at load equal bitsandbytes' own dequantize_blockwise + offset bit for bit (fp32),
    the last partial nested block included; a changed code byte changes them (negative control)."""
    from quant.nf4 import _block_scales, _quant_state

    packed, state = _bnb_reference(_weight(*shape))
    stored = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    ours = _block_scales(stored, _quant_state(stored["weight.quant_state.bitsandbytes__nf4"]), packed.device)
    theirs = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert ours.dtype == theirs.dtype == torch.float32 and torch.equal(ours, theirs)
    stored["weight.absmax"] = stored["weight.absmax"].clone()
    stored["weight.absmax"][-1] ^= 1
    changed = _block_scales(stored, _quant_state(stored["weight.quant_state.bitsandbytes__nf4"]), packed.device)
    assert not torch.equal(changed, theirs)


LOAD_WITHOUT_BNB = """
import sys, torch
sys.path.insert(0, {root!r})
from safetensors.torch import load_file
from quant.nf4 import NF4Linear
tensors = load_file({path!r})
layer = NF4Linear.from_stored({{k: v for k, v in tensors.items() if k != "expected"}})
print(torch.equal(layer.absmax, tensors["expected"]), "bitsandbytes" in sys.modules)
"""


def test_loading_a_stored_layer_does_not_import_bitsandbytes(tmp_path):
    """A start-up from the pre-quantized store skips bitsandbytes' import (about 2 s), with the same scales."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import save_file

    layer = quantize_linear(_weight(64, 256), "nf4")
    save_file({**layer.stored_tensors(), "expected": layer.absmax}, tmp_path / "layer.safetensors")
    root = str(Path(__file__).resolve().parents[1])
    script = LOAD_WITHOUT_BNB.format(root=root, path=str(tmp_path / "layer.safetensors"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]


def test_broken_double_quantization_is_a_checkpoint_error():
    stored = quantize_linear(_weight(64, 128), "nf4").stored_tensors()
    with pytest.raises(CheckpointError, match="double quantization"):
        NF4Linear.from_stored({**stored, "weight.nested_absmax": stored["weight.nested_absmax"][:0]})
    with pytest.raises(CheckpointError, match="quant state"):
        not_json = torch.tensor([255], dtype=torch.uint8)
        NF4Linear.from_stored({**stored, "weight.quant_state.bitsandbytes__nf4": not_json})


@pytest.mark.parametrize("shape", [(7, 90), (64, 128), (3, 64)])
def test_our_dequantization_is_bitsandbytes_bit_for_bit(shape):
    """quant/kernels/dequant_nf4.py (the GPU prefill's weight; here in Triton's interpreter on the CPU, on a GPU in
    tests/test_quant_kernels.py) equals bitsandbytes' dequantize_4bit in fp32, odd sizes included; a changed scale
    shows (negative control). In bf16 the interpreter truncates where the GPU rounds to nearest even: within one
    bf16 step here, exact on the GPU."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter runs only without a GPU; the GPU case is in test_quant_kernels.py")
    from quant.kernels.dequant_nf4 import dequant_nf4

    layer = quantize_linear(_weight(*shape), "nf4")
    state = bnbf.QuantState(absmax=layer.absmax.float(), shape=torch.Size(shape), code=layer.code,
                            blocksize=layer.blocksize, quant_type="nf4", dtype=torch.float32)
    theirs = bnbf.dequantize_4bit(layer.weight, state)
    ours = dequant_nf4(layer.weight, layer.absmax, layer.code, layer.blocksize, torch.Size(shape), torch.float32)
    assert torch.equal(ours, theirs)
    ours = dequant_nf4(layer.weight, layer.absmax, layer.code, layer.blocksize, torch.Size(shape), torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and ((ours.float() - theirs).abs() <= theirs.abs() * 2.0**-7).all()
    off = dequant_nf4(layer.weight, layer.absmax * 1.01, layer.code, layer.blocksize, torch.Size(shape), torch.float32)
    assert not torch.equal(off, theirs)
