"""The voice library: named references (codec codes + transcript) kept in one folder for reuse.

A voice is one safetensors file, NAME.safetensors: the tensor "codes" (int16 [num_codebooks, T]) and metadata
(format version, transcript, where the codes came from: the sha256 of the source recording, or the generated
take that was frozen into a permanent reference). Encoding a recording needs the codec's encoder; the library
keeps the codes, so later runs need neither the recording nor the encoder. Files are written atomically: a crash
never leaves a corrupt voice, and a voice that fails its checks on loading says so by name.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.errors import CheckpointError, InputError
from runtime.prompt import Reference, check_codes
from runtime.safetensors_io import read_safetensors_header, read_tensor, write_safetensors

FORMAT_VERSION = "1"
DEFAULT_LIBRARY = Path.home() / ".local" / "share" / "s2edge" / "voices"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Voice:
    name: str
    codes: torch.Tensor  # [num_codebooks, T] int64
    text: str  # the transcript of what the codes say
    source: str  # "recording NAME sha256:HEX" or "take ..." (a generated take frozen as a reference)
    created: str = ""  # ISO 8601, UTC; set when saved

    @property
    def frames(self) -> int:
        return self.codes.shape[1]

    def reference(self) -> Reference:
        return Reference(self.codes, self.text)


def recording_source(path: Path) -> str:
    """Identify a recording by file name and content: the voice stays traceable after the file is gone."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"recording {path.name} sha256:{digest.hexdigest()}"


class VoiceLibrary:
    """The voices in `folder`, one file each. The folder is created on the first save."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        if not _NAME.fullmatch(name):
            raise InputError(f"'{name}' is not a valid voice name: use 1-64 letters, digits, '_', '-' or '.', "
                             "starting with a letter or digit")
        return self.folder / f"{name}{_SUFFIX}"

    def names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.name[: -len(_SUFFIX)] for p in self.folder.glob(f"*{_SUFFIX}")
                      if _NAME.fullmatch(p.name[: -len(_SUFFIX)]))

    def save(self, voice: Voice, replace: bool = False) -> Voice:
        """Write the voice; refuse to overwrite one of the same name unless `replace`. Returns it as stored."""
        path = self.path(voice.name)
        if path.exists() and not replace:
            raise InputError(f"voice '{voice.name}' already exists in {self.folder}: choose another name or replace it")
        if not voice.text.strip():
            raise InputError(f"voice '{voice.name}': the transcript is empty")
        codes = voice.codes.to(torch.int64)
        if codes.ndim != 2 or codes.shape[1] == 0 or int(codes.min()) < 0 or int(codes.max()) > torch.iinfo(torch.int16).max:
            raise InputError(f"voice '{voice.name}': codes {list(codes.shape)} are not [codebooks, frames] in int16 range")
        created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        metadata = {"format": "s2edge-voice", "format_version": FORMAT_VERSION, "name": voice.name,
                    "text": voice.text, "source": voice.source, "created": created}
        stored = codes.to(torch.int16).contiguous()
        write_safetensors(path, [("codes", tuple(stored.shape), torch.int16)], lambda _k: stored, metadata)
        return Voice(voice.name, codes, voice.text, voice.source, created)

    def load(self, name: str, num_codebooks: int | None = None, codebook_size: int | None = None) -> Voice:
        """Read and check a voice; with a model's codebook layout, its codes are checked against it too."""
        path = self.path(name)
        if not path.exists():
            known = ", ".join(self.names()) or "none"
            raise InputError(f"no voice '{name}' in {self.folder} (voices: {known})")
        try:
            entries, metadata = read_safetensors_header(path)
            if metadata.get("format") != "s2edge-voice" or "codes" not in entries:
                raise CheckpointError("not a voice file")
            if metadata.get("format_version") != FORMAT_VERSION:
                raise CheckpointError(f"format version {metadata.get('format_version')}, this s2edge reads "
                                      f"{FORMAT_VERSION}")
            codes = read_tensor(entries["codes"]).to(torch.int64)
        except (CheckpointError, KeyError, ValueError, RuntimeError) as exc:
            raise InputError(f"voice '{name}' ({path}) is unreadable: {exc}") from None
        if num_codebooks is not None and codebook_size is not None:
            codes = check_codes(codes, num_codebooks, codebook_size, what=f"voice '{name}'")
        elif codes.ndim != 2:
            raise InputError(f"voice '{name}': codes of shape {list(codes.shape)}, expected [codebooks, frames]")
        return Voice(name, codes, metadata.get("text", ""), metadata.get("source", ""), metadata.get("created", ""))

    def remove(self, name: str) -> None:
        path = self.path(name)
        if not path.exists():
            raise InputError(f"no voice '{name}' in {self.folder}")
        path.unlink()
