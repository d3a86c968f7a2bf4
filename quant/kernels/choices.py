"""The GEMV configurations chosen by timing (tiles.fastest), kept in a file so that later processes skip the timing.

Choosing times every candidate of a shape in CUDA graphs over cold copies of its weights: 0.05-0.24 s per shape
once compiled, about a second of each command's start-up for a precision plan's 6-8 shapes
(benchmarks/results/kernel-choice-*.md, cli-wall-*.md). The choice depends on the GPU, the library versions and
our kernels, so an entry is kept under all of them: the GPU's name, compute capability and SM count, torch's and
Triton's versions and a hash of this package's source. Any change there makes a new entry, and the GPU's entries
under its old identity are dropped. An entry names its choice by repr among the candidates of the call that asks,
so a candidate list that changed is a miss, not a wrong pick. A missing, unreadable or unwritable file only means
timing again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from pathlib import Path
from typing import Sequence

import torch

from runtime.files import atomic_path

FORMAT = 1
KERNEL_CHOICES = "kernel-choices.json"  # its name in a cache folder
_KERNELS = Path(__file__).resolve().parent


class ChoiceFile:
    """Choices per machine identity in one JSON file: {"format": 1, "machines": {identity: {entry: choice}}}."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()  # first calls may choose from several threads (tiles.first_calls)
        self._machines: dict[str, dict[str, str]] | None = None

    def recall(self, device: torch.device, key: tuple, candidates: Sequence) -> int | None:
        """The index of the kept choice among `candidates` (None is a candidate of its own: cuBLAS), or None."""
        entry = self._read().get(machine_identity(device), {}).get(entry_name(key, candidates))
        return next((i for i, c in enumerate(candidates) if repr(c) == entry), None)

    def keep(self, device: torch.device, key: tuple, candidates: Sequence, choice: object) -> None:
        """Keep `choice` under this machine's identity. The entries of this GPU under any other identity go: made
        with other library versions or kernels, no later process of this installation can use them, and the file
        would otherwise grow with every upgrade."""
        with self._lock:
            identity = machine_identity(device)
            machines = {name: entries for name, entries in self._read().items()
                        if name == identity or gpu_of(name) != gpu_of(identity)}
            self._machines = machines
            machines.setdefault(identity, {})[entry_name(key, candidates)] = repr(choice)
            try:
                with atomic_path(self.path) as tmp:
                    tmp.write_text(json.dumps({"format": FORMAT, "machines": machines}, indent=1, sort_keys=True))
            except OSError:
                pass  # a read-only cache folder: the next process times again

    def _read(self) -> dict[str, dict[str, str]]:
        if self._machines is None:
            try:
                raw = json.loads(self.path.read_text())
                machines = raw["machines"] if raw.get("format") == FORMAT else {}
                self._machines = {m: dict(e) for m, e in machines.items() if isinstance(e, dict)}
            except (OSError, ValueError, TypeError, KeyError, AttributeError):
                self._machines = {}
        return self._machines


def gpu_of(identity: str) -> str:
    """The GPU part of a machine identity (its name, compute capability and SM count)."""
    return identity.split(";", 1)[0]


def entry_name(key: tuple, candidates: Sequence) -> str:
    return f"{key!r} of {', '.join(repr(c) for c in candidates)}"


@functools.cache
def machine_identity(device: torch.device) -> str:
    import triton

    props = torch.cuda.get_device_properties(device)
    return (f"{props.name} sm_{props.major}{props.minor} {props.multi_processor_count} SMs; torch {torch.__version__}, "
            f"triton {triton.__version__}; kernels {source_hash()}")


@functools.cache
def source_hash() -> str:
    """sha256 (first 16 hex digits) of this package's Python files: any kernel or candidate change is new."""
    digest = hashlib.sha256()
    for path in sorted(_KERNELS.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


_file: ChoiceFile | None = None


def remember_in(path: Path | None) -> None:
    """Keep (and recall) tiles.fastest's choices in `path` from now on; None: time at every first call."""
    global _file
    _file = None if path is None else ChoiceFile(path)


def current() -> ChoiceFile | None:
    return _file
