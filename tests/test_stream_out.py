"""The background decoder behind `synthesize -o -`: the audio of the pieces, in order, and errors handed back."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from runtime.codec import CodecConfig, load_codec
from runtime.stream_out import BackgroundDecoder
from runtime.synthetic_codec import random_codes, write_synthetic_codec

TINY = CodecConfig.load("tiny")


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    path = write_synthetic_codec(tmp_path_factory.mktemp("codec") / "codec.pth", TINY, seed=3)
    return load_codec(path, TINY)


def test_pieces_come_out_in_order_as_the_whole_audio(codec):
    codes = random_codes(40, TINY, seed=2)
    whole = codec.decode(codes, chunk_frames=None).numpy()
    got, threads = [], []
    decoder = BackgroundDecoder(codec, lambda audio: (got.append(audio), threads.append(threading.get_ident())))
    bounds = (0, 1, 2, 4, 8, 16, 32, 40)  # the frame loop's host checks
    for start, stop in zip(bounds, bounds[1:]):
        decoder.push(torch.as_tensor(codes)[:, start:stop])
    decoder.close()
    assert [a.shape[0] // 2048 for a in got] == [1, 1, 2, 4, 8, 16, 8]
    assert np.abs(np.concatenate(got) - whole).max() <= 1e-5 and whole.std() > 0.01
    caller = threading.get_ident()  # the first 16 frames at once, by the caller; the others beside it
    assert threads[:5] == [caller] * 5 and caller not in threads[5:]


def test_the_pushed_codes_are_copied(codec):
    """The generation reuses its frame buffer after the call: what was pushed must not change with it."""
    codes = torch.as_tensor(random_codes(8, TINY, seed=4))
    expected = codec.decode(codes, chunk_frames=None).numpy()
    got = []
    decoder = BackgroundDecoder(codec, got.append)
    buffer = codes.clone()
    decoder.push(buffer)
    buffer.zero_()
    decoder.close()
    assert np.abs(np.concatenate(got) - expected).max() <= 1e-5


def test_an_error_of_the_sink_reaches_the_caller(codec):
    calls = []

    def sink(audio):
        calls.append(len(audio))
        if len(calls) > 1:
            raise BrokenPipeError(32, "Broken pipe")

    decoder = BackgroundDecoder(codec, sink)
    decoder.push(torch.as_tensor(random_codes(16, TINY, seed=5)))  # the first 16 frames: written by the caller
    with pytest.raises(BrokenPipeError):
        for _ in range(200):  # a later push raises once the thread has met the error, or close does
            decoder.push(torch.as_tensor(random_codes(1, TINY, seed=6)))
        decoder.close()
    assert calls == [16 * 2048, 2048]  # nothing is written after the first failure


def test_a_short_take_is_all_decoded_by_the_caller(codec):
    codes = torch.as_tensor(random_codes(3, TINY, seed=7))
    got = []
    decoder = BackgroundDecoder(codec, got.append)
    decoder.push(codes[:, :1])
    decoder.push(codes[:, 1:])
    decoder.close()
    assert [len(a) for a in got] == [2048, 2 * 2048] and decoder.thread.ident is None  # never started


def test_the_wav_stream_reads_back_as_the_file_would(tmp_path):
    import io

    import soundfile as sf

    from runtime.audio import WavPipe, write_audio

    samples = np.random.default_rng(0).uniform(-1.2, 1.2, 30000).astype(np.float32)  # clipped past full scale
    out = io.BytesIO()
    pipe = WavPipe(out)
    pipe.write(samples[:10000])
    pipe.write(samples[10000:])
    streamed, rate = sf.read(io.BytesIO(out.getvalue()), dtype="int16")
    written, _ = sf.read(write_audio(tmp_path / "a.wav", samples), dtype="int16")
    assert rate == 44100 and streamed.shape == (30000,) and np.array_equal(streamed, written)


def test_a_failed_warm_up_is_reported_not_lost(codec, monkeypatch):
    """Whatever fails on the thread, its first piece included, is raised to the caller rather than dropping audio."""
    from runtime import stream_out

    real_push = stream_out.DecodeStream.push

    def push(stream, codes):
        if threading.current_thread().name == "s2edge-audio":  # the thread's warm-up fails
            raise RuntimeError("no kernel")
        return real_push(stream, codes)

    monkeypatch.setattr(stream_out.DecodeStream, "push", push)
    decoder = BackgroundDecoder(codec, lambda audio: None)
    decoder.push(torch.as_tensor(random_codes(16, TINY, seed=8)))  # by the caller: fine
    with pytest.raises(RuntimeError, match="no kernel"):  # by the next push if the thread failed by then, else by close
        decoder.push(torch.as_tensor(random_codes(4, TINY, seed=9)))
        decoder.close()
