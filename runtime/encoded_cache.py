"""Recordings given to `synthesize --reference`, encoded once and kept under --cache-dir for later runs.

Why: on an H100, loading the codec with its encoder and encoding a 7 s recording took about 1.3 s of a 7-8 s
`synthesize` run, nearly all of it one-time work of the first call in a process (cuDNN, cuBLAS and attention
kernels loaded on first use; a second call took 0.03 s). The codes of a recording depend only on its samples,
the codec's weights and how the encoder ran: the key is a digest of the samples as encoded (after mixing,
resampling and the 30 s cut), the codec file's fingerprint, the device model, the codec precision and the torch
version. A changed recording, codec or GPU misses and is encoded again; nothing is ever returned for other input.

An entry is a small .npy (int16 [num_codebooks, T], 13 KB for 30 s), written atomically; one that cannot be read
is encoded again and replaced. A folder that cannot be written costs the next run an encoding, nothing more.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runtime.files import atomic_path, file_fingerprint

CACHE_VERSION = 1  # bump when the encoder's output for the same input changes meaning
FOLDER = "encoded-references"


def device_identity(device: torch.device) -> str:
    """What decides the encoder's arithmetic besides its weights: the GPU model (kernels differ by card) and torch."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{name}|torch {torch.__version__}"


@dataclass(frozen=True)
class EncodedCache:
    folder: Path
    codec_identity: str  # the codec file's fingerprint, the device identity and the codec's dtype

    @classmethod
    def for_codec(cls, cache_dir: Path, codec_file: Path, device: torch.device, dtype: torch.dtype) -> EncodedCache:
        return cls(cache_dir / FOLDER, f"{file_fingerprint(codec_file)}|{device_identity(device)}|{dtype}")

    def path(self, samples: np.ndarray) -> Path:
        """The entry for mono float32 `samples` at the codec's rate, as the encoder would receive them."""
        digest = hashlib.sha256(f"v{CACHE_VERSION}|{self.codec_identity}|".encode())
        digest.update(np.ascontiguousarray(samples, dtype=np.float32).tobytes())
        return self.folder / f"{digest.hexdigest()[:32]}.npy"

    def get(self, samples: np.ndarray) -> np.ndarray | None:
        """The codes kept for these samples, or None (never kept, or unreadable: then encoded again)."""
        path = self.path(samples)
        try:
            codes = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        return codes if codes.ndim == 2 and np.issubdtype(codes.dtype, np.integer) else None

    def put(self, samples: np.ndarray, codes: np.ndarray) -> str | None:
        """Keep `codes` for these samples; returns a warning where the folder cannot be written, else None."""
        path = self.path(samples)
        try:
            with atomic_path(path) as tmp:
                np.save(tmp, codes.astype(np.int16))
        except OSError as exc:
            return f"could not keep the encoded reference in {self.folder} ({exc.strerror or exc})"
        return None
