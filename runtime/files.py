"""Atomic file output (a crash or a full disk never leaves a half-written file behind), output checks, and a cheap
fingerprint of an input file."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from runtime.errors import InputError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only if the block succeeds.

    The temporary file keeps the target's suffix so that writers which pick a format from the
    extension (soundfile, numpy) behave as they would on the real name. The file ends with the permissions a plain
    `open` would give it (an existing target's, else 0o666 less the umask), not the temporary file's owner-only 0o600.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, target.stat().st_mode & 0o7777 if target.exists() else _new_file_mode())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def check_output(path: Path, suffixes: tuple[str, ...] = ()) -> None:
    """Fail now, before any work, where writing `path` at the end would: a name without one of `suffixes` (any name
    where empty), a folder in its place, or no folder above it in which a file can be created (probed with a
    temporary file, deleted at once; nothing else is created)."""
    if suffixes and path.suffix.lower() not in suffixes:
        names = f"{', '.join(suffixes[:-1])} or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0]
        raise InputError(f"cannot write {path.name}: use a {names} file name")
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a folder")
    folder = path.absolute().parent
    while not folder.exists():  # atomic_path creates the missing folders below the nearest existing one
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"cannot write {path}: {folder} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e} in {folder}") from None


def file_fingerprint(path: Path) -> str:
    """Size, modification time and a digest of the first MiB: changes whenever a file is replaced or rewritten,
    without reading gigabytes on every start."""
    stat = path.stat()
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    return f"{stat.st_size}:{stat.st_mtime_ns}:{hashlib.sha256(head).hexdigest()[:16]}"


def _new_file_mode() -> int:
    """0o666 less the process umask: what `open(path, "w")` creates. The umask can only be read by setting it."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask
