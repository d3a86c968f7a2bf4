"""The first-run note: whether Triton's kernel cache is empty (the directory TRITON_CACHE_DIR names)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")


def test_compile_cache_empty_follows_the_cache_directory(tmp_path, monkeypatch):
    from quant.kernels import compile_cache_empty

    cache = tmp_path / "cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    assert compile_cache_empty()  # not created yet
    cache.mkdir()
    assert compile_cache_empty()
    (cache / "ABCDEF").mkdir()  # one compiled kernel's folder
    assert not compile_cache_empty()
