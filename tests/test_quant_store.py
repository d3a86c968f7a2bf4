"""The pre-quantized store: bit-exact round trip, provenance checks, atomic writes."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from quant import store
from quant.base import load_linear, quantize_linear
from quant.store import StaleStoreError, load_store, save_store

HASHES = {"model-00001-of-00002.safetensors": "ab" * 32, "model-00002-of-00002.safetensors": "cd" * 32}


@pytest.fixture(scope="module")
def modules():
    gen = torch.Generator().manual_seed(0)
    weights = {
        "layers.0.attention.wqkv": torch.randn(192, 128, generator=gen),
        "layers.0.attention.wo": torch.randn(128, 128, generator=gen),
        "layers.1.attention.wqkv": torch.randn(192, 128, generator=gen),  # prefix of no other name
        "fast_output": torch.randn(64, 128, generator=gen),
    }
    formats = ["nf4", "fp8", "int8", "fp8"]
    return {name: (fmt, quantize_linear(w.bfloat16() * 0.02, fmt).stored_tensors())
            for (name, w), fmt in zip(weights.items(), formats)}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _same(a, b) -> bool:
    """Same module names, formats, suffixes, dtypes, shapes and bytes."""
    if list(a) != list(b):
        return False
    for name in a:
        (fa, ta), (fb, tb) = a[name], b[name]
        if fa != fb or set(ta) != set(tb):
            return False
        for k in ta:
            if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape or not torch.equal(_bits(ta[k]), _bits(tb[k])):
                return False
    return True


def test_round_trip_is_bit_exact(tmp_path, modules):
    path = tmp_path / "model.nf4.safetensors"
    save_store(path, modules, HASHES, {"plan": "nf4"})
    loaded, metadata = load_store(path, HASHES)
    assert metadata == {"plan": "nf4"}
    assert _same(loaded, modules)
    for name, (fmt, tensors) in loaded.items():
        assert torch.equal(load_linear(fmt, tensors).dequantize(), load_linear(*modules[name]).dequantize())


def test_corrupted_byte_is_detected(tmp_path, modules):
    """Negative control: one flipped data byte makes the comparison fail."""
    path = tmp_path / "q.safetensors"
    save_store(path, modules, HASHES)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    loaded, _ = load_store(path, HASHES)
    assert not _same(loaded, modules)


@pytest.mark.parametrize(
    "hashes, reason",
    [
        ({**HASHES, "model-00002-of-00002.safetensors": "ef" * 32}, "model-00002-of-00002.safetensors changed"),
        ({"model-00001-of-00002.safetensors": "ab" * 32}, "no longer a source"),
        ({**HASHES, "model.safetensors": "00"}, "new source"),
    ],
)
def test_other_sources_are_stale(tmp_path, modules, hashes, reason):
    path = tmp_path / "q.safetensors"
    save_store(path, modules, HASHES)
    with pytest.raises(StaleStoreError, match=reason):
        load_store(path, hashes)


def test_other_format_version_is_stale(tmp_path, modules, monkeypatch):
    path = tmp_path / "q.safetensors"
    monkeypatch.setattr(store, "STORE_VERSION", store.STORE_VERSION + 1)
    save_store(path, modules, HASHES)
    monkeypatch.undo()
    with pytest.raises(StaleStoreError, match="format version"):
        load_store(path, HASHES)


def test_missing_truncated_and_foreign_files_are_stale(tmp_path, modules):
    with pytest.raises(StaleStoreError, match="no pre-quantized file"):
        load_store(tmp_path / "absent.safetensors", HASHES)
    path = tmp_path / "q.safetensors"
    save_store(path, modules, HASHES)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(StaleStoreError, match="truncated"):
        load_store(path, HASHES)
    header = json.dumps({"__metadata__": {"kind": "something-else"}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(StaleStoreError, match="not an s2edge"):
        load_store(path, HASHES)


def test_failed_write_leaves_no_file(tmp_path, modules):
    path = tmp_path / "q.safetensors"
    broken = {**modules, "bad": ("fp8", {"weight": torch.empty(4, 4, device="meta")})}
    with pytest.raises(Exception):
        save_store(path, broken, HASHES)
    assert list(tmp_path.iterdir()) == []
