"""Atomic file output: a crash or a full disk never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


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


def _new_file_mode() -> int:
    """0o666 less the process umask: what `open(path, "w")` creates. The umask can only be read by setting it."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask
