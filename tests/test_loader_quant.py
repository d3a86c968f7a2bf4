"""Quantize-on-load, the pre-quantized store and the community s2-pro-fp8 layout, on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

from quant.base import QuantizedLinear
from runtime.checkpoint import open_checkpoint
from runtime.errors import ResourceError
from runtime.loader import WeightFormats, load_model
from runtime.synthetic import write_fp8_checkpoint

CPU = torch.device("cpu")


def logits(loaded, seed=0):
    model = loaded.model
    model.setup_caches(64, torch.float32, "cpu")
    tokens = torch.randint(0, 256, (1, 11, 20), generator=torch.Generator().manual_seed(seed))
    tokens[:, 1:] = 0
    with torch.inference_mode():
        return model.head_logits(model.forward_slow(tokens, 0))[0].float()


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantized_load_is_close_to_float(tiny_checkpoint, tiny_model, fmt):
    q = load_model(tiny_checkpoint, CPU, torch.float32, formats=WeightFormats(fmt, fmt))
    layers = linears(q.model)
    assert len(layers) == 2 * 5 + 2 * 5 + 1  # 5 linears per block in both stacks, plus the fast head
    assert all(m.format == fmt for m in layers.values())
    ref, got = logits(tiny_model), logits(q)
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.05, rel
    half = load_model(tiny_checkpoint, CPU, torch.float32, formats=WeightFormats(fmt, "bf16"))
    assert not any(n.startswith("fast_") for n in linears(half.model))


def test_store_round_trip_and_rebuild(tiny_checkpoint, tmp_path):
    store = tmp_path / "q.safetensors"
    formats = WeightFormats("int8", "fp8")
    first = load_model(tiny_checkpoint, CPU, torch.float32, formats=formats, store=store)
    assert store.exists()
    mtime = store.stat().st_mtime_ns
    second = load_model(tiny_checkpoint, CPU, torch.float32, formats=formats, store=store)
    assert store.stat().st_mtime_ns == mtime  # reused, not rewritten
    for name, layer in linears(first.model).items():
        other = linears(second.model)[name]
        for key, tensor in layer.stored_tensors().items():
            assert torch.equal(tensor, other.stored_tensors()[key]), (name, key)
    assert torch.equal(logits(first), logits(second))
    shard = next(tiny_checkpoint.glob("model-00001*.safetensors"))
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a changed source file
    try:
        load_model(tiny_checkpoint, CPU, torch.float32, formats=formats, store=store)
        assert store.stat().st_mtime_ns != mtime  # rebuilt
    finally:
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_store_that_cannot_be_saved_is_a_warning(tiny_checkpoint, tmp_path):
    """A full disk or an unwritable cache folder must not cost the loaded model: it loads, with a warning."""
    (tmp_path / "file").write_bytes(b"x")
    store = tmp_path / "file" / "q.safetensors"  # its folder is a file: saving fails with NotADirectoryError
    loaded = load_model(tiny_checkpoint, CPU, torch.float32, formats=WeightFormats("int8", "int8"), store=store)
    assert len(loaded.warnings) == 1 and "could not save the quantized weights" in loaded.warnings[0]
    assert linears(loaded.model) and torch.isfinite(logits(loaded)).all()
    saved = load_model(tiny_checkpoint, CPU, torch.float32, formats=WeightFormats("int8", "int8"),
                       store=tmp_path / "q.safetensors")
    assert saved.warnings == () and (tmp_path / "q.safetensors").exists()


def test_community_fp8_layout_loads_as_is(tmp_path, tiny_config):
    folder = write_fp8_checkpoint(tmp_path / "fp8", tiny_config, seed=3)
    ckpt = open_checkpoint(folder)
    assert "_buf.fast_freqs_cis" not in ckpt.tensors
    loaded = load_model(folder, CPU, torch.float32)
    layers = linears(loaded.model)
    assert len(layers) == 21 and all(m.format == "fp8" for m in layers.values())
    for name, layer in layers.items():  # matches the dequantized reference: e4m3 value x row scale
        weight, scale = ckpt.read(name + ".weight"), ckpt.read(name + ".weight.scale")
        torch.testing.assert_close(layer.dequantize(torch.float32), weight.float() * scale, rtol=0, atol=0)
    assert loaded.model.embeddings.weight.dtype == torch.float32
    assert torch.isfinite(logits(loaded)).all()


def test_nf4_needs_cuda(tiny_checkpoint):
    with pytest.raises(ResourceError, match="nf4 needs a CUDA GPU"):
        load_model(tiny_checkpoint, CPU, torch.float32, formats=WeightFormats("nf4", "bf16"))
