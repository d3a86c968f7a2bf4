"""The cache of encoded recordings: one entry per samples, codec file, device and dtype; bad entries are misses."""

from __future__ import annotations

import numpy as np
import torch

from runtime.encoded_cache import EncodedCache


def _codec_file(tmp_path, content: bytes = b"codec weights"):
    path = tmp_path / "codec.pth"
    path.write_bytes(content)
    return path


def test_codes_come_back_for_the_same_samples_only(tmp_path):
    cache = EncodedCache.for_codec(tmp_path / "cache", _codec_file(tmp_path), torch.device("cpu"), torch.float32)
    samples = np.random.default_rng(0).standard_normal(4410).astype(np.float32)
    codes = np.arange(30).reshape(10, 3)
    assert cache.get(samples) is None
    assert cache.put(samples, codes) is None
    kept = cache.get(samples)
    assert kept.dtype == np.int16 and np.array_equal(kept, codes)
    changed = samples.copy()
    changed[100] += 1e-3  # one sample off: another recording
    assert cache.get(changed) is None and cache.get(samples[:-1]) is None


def test_the_key_follows_the_codec_file_and_how_it_encodes(tmp_path):
    codec = _codec_file(tmp_path)
    samples = np.zeros(100, np.float32)
    base = EncodedCache.for_codec(tmp_path, codec, torch.device("cpu"), torch.float32)
    same = EncodedCache.for_codec(tmp_path, codec, torch.device("cpu"), torch.float32)
    other_dtype = EncodedCache.for_codec(tmp_path, codec, torch.device("cpu"), torch.bfloat16)
    assert base.path(samples) == same.path(samples)  # negative control: nothing changed, the same entry
    assert other_dtype.path(samples) != base.path(samples)
    codec.write_bytes(b"other weights")
    assert EncodedCache.for_codec(tmp_path, codec, torch.device("cpu"), torch.float32).path(samples) != base.path(samples)


def test_an_unreadable_entry_is_a_miss_and_an_unwritable_folder_a_warning(tmp_path):
    samples = np.ones(100, np.float32)
    cache = EncodedCache.for_codec(tmp_path / "cache", _codec_file(tmp_path), torch.device("cpu"), torch.float32)
    cache.folder.mkdir(parents=True)
    cache.path(samples).write_bytes(b"\x93NUMPY truncated")
    assert cache.get(samples) is None
    np.save(cache.path(samples), np.ones(5))  # floats, one dimension: not codes
    assert cache.get(samples) is None
    (tmp_path / "file").write_text("")
    blocked = EncodedCache(tmp_path / "file" / "cache", cache.codec_identity)
    warning = blocked.put(samples, np.zeros((10, 2), np.int64))
    assert warning is not None and "could not keep the encoded reference" in warning
    assert blocked.get(samples) is None
