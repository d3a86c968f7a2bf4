"""What s2edge keeps in its cache folder (--cache-dir, S2EDGE_CACHE), found by kind, sized and removable.

Why: the pre-quantized weights take gigabytes per precision plan, and a user who tries every mode collects several
of them; a write killed midway (power loss, SIGKILL) leaves its temporary file behind. The folder may be shared
with other files, so only what s2edge wrote is listed or removed: safetensors files whose header says they are an
s2edge store, the kernel-choices file, the encoded-reference entries, and the temporary files of s2edge's atomic
writes (".<name>.<random>.tmp<suffix>", runtime/files.py), which are named after the entries above.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path

from quant.kernels.choices import KERNEL_CHOICES
from quant.store import STORE_KIND
from runtime.encoded_cache import FOLDER as ENCODED
from runtime.errors import CheckpointError
from runtime.safetensors_io import read_safetensors_header

KINDS = ("weights", "kernel-choices", "references", "unfinished")
_UNFINISHED = re.compile(r"\..+\.tmp(\.safetensors|\.json|\.npy)")


@dataclass(frozen=True)
class CacheEntry:
    kind: str  # one of KINDS
    paths: tuple[Path, ...]  # the files it takes
    size: int  # bytes
    detail: str
    modified: dt.datetime


def cache_entries(folder: Path) -> list[CacheEntry]:
    """Everything s2edge keeps in `folder`, by kind (KINDS order), then by name."""
    if not folder.is_dir():
        return []
    entries = [_store(path) for path in sorted(folder.glob("*.safetensors")) if not path.name.startswith(".")]
    entries = [entry for entry in entries if entry is not None]
    if (choices := folder / KERNEL_CHOICES).is_file():
        entries.append(_entry("kernel-choices", [choices], _kernel_choices_detail(choices)))
    references = sorted((folder / ENCODED).glob("*.npy"))
    if references:
        entries.append(_entry("references", references, f"{len(references)} encoded recording"
                              + ("s" if len(references) > 1 else "")))
    unfinished = sorted(p for base in (folder, folder / ENCODED) for p in base.glob(".*.tmp*")
                        if p.is_file() and _UNFINISHED.fullmatch(p.name))
    entries += [_entry("unfinished", [path], "left by a write that never finished") for path in unfinished]
    return entries


def remove(entries: list[CacheEntry]) -> int:
    """Delete the entries' files (and the encoded-reference folder once empty); returns the bytes freed."""
    freed = 0
    for entry in entries:
        for path in entry.paths:
            path.unlink(missing_ok=True)
        freed += entry.size
        folder = entry.paths[0].parent
        if folder.name == ENCODED and not any(folder.iterdir()):
            folder.rmdir()
    return freed


def size_text(n: int) -> str:
    """Bytes for a person: 2.61 GiB, 13.0 KiB, 512 B."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n} B"


def _entry(kind: str, paths: list[Path], detail: str) -> CacheEntry:
    stats = [path.stat() for path in paths]
    modified = dt.datetime.fromtimestamp(max(s.st_mtime for s in stats))
    return CacheEntry(kind, tuple(paths), sum(s.st_size for s in stats), detail, modified)


def _store(path: Path) -> CacheEntry | None:
    """A pre-quantized store, described by the formats it holds; None for a file s2edge did not write."""
    try:
        _, header = read_safetensors_header(path)
    except CheckpointError:
        return None
    if header.get("kind") != STORE_KIND:
        return None
    try:
        formats = json.loads(header.get("metadata", "{}"))
        detail = f"{formats['slow']}, fast AR {formats['fast']}"
    except (ValueError, KeyError, TypeError):
        detail = "quantized weights"
    return _entry("weights", [path], detail)


def _kernel_choices_detail(path: Path) -> str:
    try:
        machines = json.loads(path.read_text()).get("machines", {})
        count = len(machines) if isinstance(machines, dict) else 0
    except (OSError, ValueError, AttributeError):
        return "unreadable: chosen again by timing"
    return f"{count} GPU and version combination" + ("s" if count != 1 else "")
