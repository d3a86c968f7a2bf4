"""Triton's kernel cache: the first-run note (whether the directory TRITON_CACHE_DIR names is empty), and the
digest of Triton's installation that keys it, made on a thread at start-up."""

from __future__ import annotations

import time

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


def test_the_installation_digest_is_made_in_the_background():
    from triton.runtime.cache import triton_key

    from quant.kernels import hash_triton_in_background

    triton_key.cache_clear()
    assert triton_key.cache_info().currsize == 0  # negative control: nothing made yet
    start = time.perf_counter()
    hash_triton_in_background()
    assert time.perf_counter() - start < 0.1  # returns at once
    while triton_key.cache_info().currsize == 0 and time.perf_counter() - start < 60:
        time.sleep(0.01)
    hits = triton_key.cache_info().hits
    triton_key()
    assert triton_key.cache_info().hits == hits + 1  # the launch's call finds it made
