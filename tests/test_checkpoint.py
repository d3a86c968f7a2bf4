"""Checkpoint layout: key remapping, expected shapes, synthetic round trip, bad files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from conftest import spec_tensors
from runtime.checkpoint import INDEX_NAME, expected_shapes, open_checkpoint, remap_key, validate
from runtime.config import bundled_config
from runtime.errors import CheckpointError
from runtime.model import DualAR
from runtime.safetensors_io import write_safetensors
from runtime.synthetic import checkpoint_key

LLM_ROWS = spec_tensors("llm")


def test_inventory_has_358_llm_tensors():
    assert len(LLM_ROWS) == 358


@pytest.mark.parametrize("ckpt_key, runtime_key", [(c, r) for c, r, _ in LLM_ROWS])
def test_remap_matches_official_inventory(ckpt_key, runtime_key):
    assert remap_key(ckpt_key) == runtime_key
    assert checkpoint_key(runtime_key) == ckpt_key


def test_expected_shapes_equal_official_inventory():
    shapes = expected_shapes(bundled_config("s2-pro"))
    assert shapes == {r: s for _, r, s in LLM_ROWS}


def test_model_parameters_are_exactly_the_checkpoint_tensors(tiny_config):
    with torch.device("meta"):
        model = DualAR(bundled_config("s2-pro"))
    params = {k: tuple(v.shape) for k, v in model.named_parameters()}
    assert params == expected_shapes(bundled_config("s2-pro"))
    assert sum(p.numel() for p in model.parameters()) == 4_561_852_416


def test_synthetic_round_trip_every_tensor_identical(tiny_checkpoint, tiny_config):
    ckpt = open_checkpoint(tiny_checkpoint)
    validate(ckpt)
    index = json.loads((tiny_checkpoint / INDEX_NAME).read_text())
    assert len(ckpt.shards) == 2 and index["metadata"]["total_parameters"] == tiny_config.parameter_count()
    # as in the released index, the fast-AR (audio_decoder.*) tensors all live in the last shard
    assert all(f.endswith("2.safetensors") for k, f in index["weight_map"].items() if k.startswith("audio_decoder."))
    seen = 0
    for shard in ckpt.shards:  # the safetensors library is the independent reader
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                ours = ckpt.read(remap_key(key))
                theirs = f.get_tensor(key)
                assert ours.dtype == theirs.dtype == torch.bfloat16
                assert torch.equal(ours, theirs), key
                seen += 1
    assert seen == len(expected_shapes(tiny_config))


def test_loaded_model_holds_checkpoint_values(tiny_checkpoint, tiny_model):
    ckpt = open_checkpoint(tiny_checkpoint)
    state = tiny_model.model.state_dict()
    for key in expected_shapes(tiny_model.config):
        assert torch.equal(state[key], ckpt.read(key).float()), key
    legal = tiny_model.model.legal_ids
    assert torch.equal(tiny_model.model.head.weight, state["embeddings.weight"][legal])


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_folder_and_files(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="folder not found"):
        open_checkpoint(tmp_path / "nope")
    ckpt = _copy(tiny_checkpoint, tmp_path / "a")
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors .* is missing"):
        open_checkpoint(ckpt)
    ckpt = _copy(tiny_checkpoint, tmp_path / "b")
    (ckpt / INDEX_NAME).unlink()
    for shard in ckpt.glob("*.safetensors"):
        shard.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json or model.safetensors"):
        open_checkpoint(ckpt)


def test_truncated_shard_is_named(tmp_path, tiny_checkpoint):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    shard = ckpt / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: truncated shard"):
        open_checkpoint(ckpt)
    shard.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        open_checkpoint(ckpt)


def test_wrong_shape_tensor_is_named(tmp_path, tiny_checkpoint, tiny_config):
    ckpt = _copy(tiny_checkpoint, tmp_path / "d")
    shard = ckpt / "model-00002-of-00002.safetensors"  # holds audio_decoder.output.weight
    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bad_key = "audio_decoder.output.weight"
    tensors[bad_key] = tensors[bad_key][:, :-1].contiguous()
    write_safetensors(shard, [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()], tensors.__getitem__)
    with pytest.raises(CheckpointError, match=r"'fast_output.weight' .* shape \[64, 63\], expected \[64, 64\]"):
        validate(open_checkpoint(ckpt))


def test_config_without_required_field(tmp_path, tiny_checkpoint):
    ckpt = _copy(tiny_checkpoint, tmp_path / "e")
    raw = json.loads((ckpt / "config.json").read_text())
    del raw["audio_decoder_config"]["n_layer"]
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="'n_layer' is missing from audio_decoder_config"):
        open_checkpoint(ckpt)


def test_our_writer_is_readable_by_the_library(tmp_path):
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int64)}
    path = tmp_path / "x.safetensors"
    write_safetensors(path, [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()], tensors.__getitem__,
                      metadata={"format": "pt"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k), t)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_staged_reads_land_on_the_gpu_bit_for_bit(tmp_path, monkeypatch):
    """Reading through CudaStaging (chunks read by its threads into pinned buffers, each copied as it arrives; a chunk
    of 1 KiB here, so every tensor but the empty one spans several, several reads are in flight and the buffers are
    reused) gives the CPU read's bytes on the GPU, one tensor at a time or many in a row (read_all, in their order);
    a truncated file is a short read."""
    from runtime.safetensors_io import CudaStaging, read_safetensors_header, read_tensor

    monkeypatch.setattr(CudaStaging, "CHUNK", 1024)
    gen = torch.Generator().manual_seed(0)
    tensors = {"empty": torch.zeros(0, 4, dtype=torch.bfloat16), "odd": torch.randn(3, 333, generator=gen),
               "big": torch.randn(257, 1031, generator=gen).bfloat16(), "bytes": torch.randint(0, 255, (5001,),
                                                                                                generator=gen).byte()}
    path = tmp_path / "t.safetensors"
    write_safetensors(path, [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()], tensors.__getitem__)
    entries, _ = read_safetensors_header(path)
    staging = CudaStaging(torch.device("cuda"))
    for key, tensor in tensors.items():
        staged = read_tensor(entries[key], staging)
        assert staged.is_cuda and staged.dtype == tensor.dtype and torch.equal(staged.cpu(), tensor), key
        assert torch.equal(read_tensor(entries[key]), tensor), key
    order = ["odd", "empty", "big", "empty", "bytes", "odd", "big", "empty"]  # tensors with chunks in flight across
    for key, staged in zip(order, staging.read_all(entries[key] for key in order), strict=True):
        assert staged.is_cuda and torch.equal(staged.cpu(), tensors[key]), key
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="short read"):
        read_tensor(entries["bytes"], staging)
    with pytest.raises(CheckpointError, match="short read"):
        list(staging.read_all(entries[key] for key in ["odd", "bytes", "big"]))


def test_no_pinned_memory_means_pageable_reads(monkeypatch):
    """Reads bound for a GPU go through pinned buffers only where they can be had: on the CPU, or when the host
    refuses page-locked memory, there is no staging (the loader then reads as for the CPU and copies)."""
    from runtime import safetensors_io

    assert safetensors_io.cuda_staging(torch.device("cpu")) is None

    def refuse(self, device):
        raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")

    monkeypatch.setattr(safetensors_io.CudaStaging, "__init__", refuse)
    assert safetensors_io.cuda_staging(torch.device("cuda")) is None
