"""Atomic output files: all or nothing, with the permissions a plain write would give them."""

import os
import stat

import pytest

from runtime.files import atomic_path


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_file_gets_the_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "out.wav") as tmp:
            tmp.write_bytes(b"abc")
    finally:
        os.umask(old)
    assert (tmp_path / "out.wav").read_bytes() == b"abc"
    assert mode(tmp_path / "out.wav") == 0o640  # not mkstemp's 0o600


def test_existing_file_keeps_its_permissions(tmp_path):
    target = tmp_path / "codes.npy"
    target.write_bytes(b"old")
    os.chmod(target, 0o604)
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and mode(target) == 0o604


def test_failed_block_leaves_nothing(tmp_path):
    target = tmp_path / "out.wav"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]
