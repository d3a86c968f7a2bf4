"""`s2edge cache list` and `clear`: what s2edge wrote in the cache folder is found, sized and removed; nothing else."""

from __future__ import annotations

import json

import numpy as np
import torch
from click.testing import CliRunner

from quant.store import save_store
from runtime.cache_folder import cache_entries, size_text
from runtime.cli import main
from runtime.encoded_cache import EncodedCache
from runtime.safetensors_io import write_safetensors


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _filled(folder):
    """A cache folder as runs leave it, with files of others beside: {kind: our paths}, [foreign paths]."""
    store = folder / "s2-pro-nf4-bf16.safetensors"
    save_store(store, {"layers.0.w": ("nf4", {"weight": torch.zeros(64, 8, dtype=torch.uint8)})}, {"a": "1"},
               {"slow": "nf4", "fast": "bf16"})
    choices = folder / "kernel-choices.json"
    choices.write_text(json.dumps({"format": 1, "machines": {"gpu a": {}, "gpu b": {}}}))
    codec = folder / "codec.bin"
    codec.write_bytes(b"weights")
    encoded = EncodedCache.for_codec(folder, codec, torch.device("cpu"), torch.float32)
    for seed in (1, 2):
        encoded.put(np.full(100, seed, np.float32), np.zeros((10, 4), np.int64))
    unfinished = folder / ".s2-pro-fp8-fp8.k2j4x1.tmp.safetensors"
    unfinished.write_bytes(b"\0" * 100)
    foreign = folder / "model.safetensors"  # a safetensors file of someone else's
    write_safetensors(foreign, [("w", (2,), torch.float32)], lambda key: torch.zeros(2))
    (folder / "notes.txt").write_text("mine")
    ours = {"weights": [store], "kernel-choices": [choices], "references": sorted(encoded.folder.glob("*.npy")),
            "unfinished": [unfinished]}
    return ours, [foreign, folder / "notes.txt", codec]


def test_list_shows_each_kind_with_its_size_and_nothing_foreign(tmp_path):
    ours, foreign = _filled(tmp_path)
    entries = cache_entries(tmp_path)
    assert [e.kind for e in entries] == ["weights", "kernel-choices", "references", "unfinished"]
    assert [sorted(e.paths) for e in entries] == [sorted(ours[e.kind]) for e in entries]
    assert entries[0].detail == "nf4, fast AR bf16" and entries[1].detail == "2 GPU and version combinations"
    assert entries[2].detail == "2 encoded recordings"
    total = sum(p.stat().st_size for paths in ours.values() for p in paths)
    assert sum(e.size for e in entries) == total
    listed = run("cache", "list", "--cache-dir", tmp_path)
    assert listed.exit_code == 0, listed.output
    assert "s2-pro-nf4-bf16.safetensors" in listed.output and "encoded-references/" in listed.output
    assert f"total {size_text(total)}" in listed.output
    assert all(p.name not in listed.output for p in foreign)


def test_clear_removes_the_kinds_asked_for_and_leaves_other_files(tmp_path):
    ours, foreign = _filled(tmp_path)
    partial = run("cache", "clear", "--only", "references", "--only", "unfinished", "--cache-dir", tmp_path)
    assert partial.exit_code == 0 and "removed 2 entries" in partial.output, partial.output
    assert not (tmp_path / "encoded-references").exists() and not ours["unfinished"][0].exists()
    assert ours["weights"][0].exists() and ours["kernel-choices"][0].exists()
    everything = run("cache", "clear", "--cache-dir", tmp_path)
    assert everything.exit_code == 0 and "removed 2 entries" in everything.output, everything.output
    assert not ours["weights"][0].exists() and not ours["kernel-choices"][0].exists()
    assert all(p.exists() for p in foreign)
    assert "nothing cached" in run("cache", "list", "--cache-dir", tmp_path).output


def test_sizes_read_as_people_write_them():
    assert [size_text(n) for n in (512, 13 * 1024, 5 * 2**20 + 2**19, int(2.61 * 2**30))] == \
        ["512 B", "13.0 KiB", "5.5 MiB", "2.61 GiB"]
