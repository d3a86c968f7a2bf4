"""The pre-quantized store: a model's quantized tensors saved once, reloaded bit-exactly on later starts.

Quantizing 4 B parameters takes time and a bf16 copy in memory; reading the result back takes neither. The file is
plain safetensors (tensor `<module>.<suffix>`, e.g. `layers.0.attention.wqkv.weight.absmax`) with a metadata
record: the store format version, the hashes of the source files it was made from (the caller computes them),
and the format and tensor list of every module. A file that is missing, unreadable, from another format version
or from other sources raises `StaleStoreError`, which the caller answers by rebuilding it.

The API knows nothing about the model: modules are `{name: (format, {suffix: tensor})}`, as `stored_tensors()`
returns them and `load_linear` takes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from runtime.errors import CheckpointError
from runtime.safetensors_io import CudaStaging, read_safetensors_header, read_tensor, write_safetensors

STORE_KIND = "s2edge-quantized"
STORE_VERSION = 1  # bump when the meaning of stored tensors changes: older files are then rebuilt

Modules = dict[str, tuple[str, dict[str, Tensor]]]


class StaleStoreError(CheckpointError):
    """The pre-quantized file cannot be used as it is (missing, unreadable, outdated): rebuild it."""


def save_store(
    path: str | os.PathLike,
    modules: Mapping[str, tuple[str, Mapping[str, Tensor]]],
    source_hashes: Mapping[str, str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `modules` with their provenance, atomically; tensors are copied to the host one at a time."""
    layout: dict[str, dict[str, object]] = {}
    tensors: dict[str, Tensor] = {}
    for name, (fmt, stored) in modules.items():
        layout[name] = {"format": fmt, "tensors": list(stored)}
        for suffix, tensor in stored.items():
            tensors[f"{name}.{suffix}"] = tensor
    header = {
        "kind": STORE_KIND,
        "format_version": str(STORE_VERSION),
        "source_hashes": json.dumps(dict(source_hashes), sort_keys=True),
        "modules": json.dumps(layout),
        "metadata": json.dumps(dict(metadata or {}), sort_keys=True),
    }
    specs = [(key, tuple(t.shape), t.dtype) for key, t in tensors.items()]
    write_safetensors(Path(path), specs, tensors.__getitem__, header)


def load_store(
    path: str | os.PathLike, source_hashes: Mapping[str, str], device: torch.device | str = "cpu",
    staging: CudaStaging | None = None,
) -> tuple[Modules, dict[str, str]]:
    """Read a store made from exactly these sources by this format version: (modules, caller metadata). With
    `staging` (the caller's, for `device`), tensors are read straight into GPU memory.

    Raises StaleStoreError (naming the first reason) when the file must be rebuilt.
    """
    path = Path(path)
    if not path.exists():
        raise StaleStoreError(f"{path.name}: no pre-quantized file yet")
    try:
        entries, header = read_safetensors_header(path)
    except CheckpointError as e:
        raise StaleStoreError(f"unreadable pre-quantized file: {e}") from None
    if header.get("kind") != STORE_KIND:
        raise StaleStoreError(f"{path.name}: not an s2edge pre-quantized file")
    if header.get("format_version") != str(STORE_VERSION):
        raise StaleStoreError(
            f"{path.name}: store format version {header.get('format_version')}, this version writes {STORE_VERSION}"
        )
    try:
        stored_hashes = json.loads(header["source_hashes"])
        layout = json.loads(header["modules"])
        metadata = json.loads(header["metadata"])
    except (KeyError, json.JSONDecodeError):
        raise StaleStoreError(f"{path.name}: corrupt metadata record") from None
    reason = _hash_mismatch(stored_hashes, dict(source_hashes))
    if reason:
        raise StaleStoreError(f"{path.name}: made from other source files ({reason})")
    keys = [f"{name}.{suffix}" for name, entry in layout.items() for suffix in entry["tensors"]]
    if missing := [key for key in keys if key not in entries]:
        raise StaleStoreError(f"{path.name}: tensor '{missing[0]}' is missing")
    wanted = [entries[key] for key in keys]
    read = staging.read_all(wanted) if staging is not None else (read_tensor(e).to(device) for e in wanted)
    modules: Modules = {}
    try:
        for name, entry in layout.items():
            modules[name] = (entry["format"], {suffix: next(read) for suffix in entry["tensors"]})
    except CheckpointError as e:
        raise StaleStoreError(f"unreadable pre-quantized file: {e}") from None
    return modules, metadata


def _hash_mismatch(stored: dict[str, str], current: dict[str, str]) -> str | None:
    """The first difference between two {file: hash} maps, in words; None if they are equal."""
    for name in sorted(stored.keys() | current.keys()):
        if name not in current:
            return f"{name} is no longer a source"
        if name not in stored:
            return f"{name} is a new source"
        if stored[name] != current[name]:
            return f"{name} changed"
    return None
