"""Audio I/O and the reference checks of the recording guide: each bad input fails with one clear line,
each doubtful one passes with a warning."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from runtime.audio import LONG_REFERENCE_S, SAMPLE_RATE, load_reference, read_audio, write_audio, write_audio_chunks
from runtime.errors import AudioError, InputError

FIXTURE = "tests/fixtures/librivox_sense_and_sensibility_0870.wav"


def voice(seconds: float, rate: int = SAMPLE_RATE, channels: int = 1, peak: float = 0.5, seed: int = 0) -> np.ndarray:
    """A voiced-sounding test signal [n, channels] with the given peak."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = np.sin(2 * np.pi * 150 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t)) + 0.05 * rng.standard_normal(t.size)
    x = np.stack([x * (1 - 0.1 * c) for c in range(channels)], axis=1)
    return (peak * x / np.abs(x).max()).astype(np.float32)


def write(path, data: np.ndarray, rate: int = SAMPLE_RATE, subtype: str = "PCM_16"):
    sf.write(str(path), data, rate, subtype=subtype)
    return path


def test_fixture_is_read_resampled_and_warned_about():
    reference = load_reference(FIXTURE)
    info = sf.info(FIXTURE)
    assert reference.samples.dtype == np.float32 and reference.samples.ndim == 1
    assert abs(reference.samples.size - info.frames * SAMPLE_RATE / info.samplerate) <= 2
    assert 0.05 < np.abs(reference.samples).max() < 1.0
    assert len(reference.warnings) == 2
    assert "16000 Hz, below 44.1 kHz" in reference.warnings[0] + reference.warnings[1]
    assert any("only 7.1 s long" in w for w in reference.warnings)


def test_clean_reference_has_no_warnings(tmp_path):
    reference = load_reference(write(tmp_path / "ok.wav", voice(12)))
    assert reference.warnings == [] and reference.samples.size == 12 * SAMPLE_RATE


def test_missing_unreadable_and_unsupported_files(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        load_reference(tmp_path / "absent.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF....not audio at all")
    with pytest.raises(AudioError, match=r"cannot read .*junk\.wav.*convert it to WAV or FLAC"):
        load_reference(tmp_path / "junk.wav")
    (tmp_path / "phone.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(64))
    with pytest.raises(AudioError, match=r"\.m4a is not supported.*ffmpeg"):
        load_reference(tmp_path / "phone.m4a")


def test_zero_length_nan_silence_and_too_short(tmp_path):
    with pytest.raises(AudioError, match="contains no audio"):
        load_reference(write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32)))
    nan = voice(5)
    nan[1000] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        load_reference(write(tmp_path / "nan.wav", nan, subtype="FLOAT"))
    with pytest.raises(AudioError, match=r"silent \(peak below -60 dBFS\)"):
        load_reference(write(tmp_path / "silent.wav", np.zeros((5 * SAMPLE_RATE, 1), np.float32)))
    with pytest.raises(AudioError, match="2.0 s long; a reference needs at least 3 s"):
        load_reference(write(tmp_path / "short.wav", voice(2)))


def test_low_sample_rate_warns_and_resamples(tmp_path):
    reference = load_reference(write(tmp_path / "phone.wav", voice(12, rate=8000), rate=8000))
    assert reference.warnings == ["phone.wav is sampled at 8000 Hz, below 44.1 kHz: upsampled, it has nothing "
                                  "above 4 kHz; record at 44.1 kHz or more"]
    assert abs(reference.samples.size - 12 * SAMPLE_RATE) <= 2
    # the resampled tone keeps its pitch: 150 Hz
    spectrum = np.abs(np.fft.rfft(reference.samples[:SAMPLE_RATE]))
    assert abs(np.argmax(spectrum) - 150) <= 1


def test_six_channels_are_mixed_with_a_warning(tmp_path):
    data = voice(12, channels=6)
    reference = load_reference(write(tmp_path / "surround.wav", data, subtype="FLOAT"))
    assert any("has 6 channels, mixed to mono" in w for w in reference.warnings)
    np.testing.assert_allclose(reference.samples, data.mean(axis=1), atol=1e-6)
    stereo = load_reference(write(tmp_path / "stereo.wav", voice(12, channels=2)))
    assert stereo.warnings == []


def test_hot_peaks_and_clipping_warn(tmp_path):
    hot = load_reference(write(tmp_path / "hot.wav", voice(12, peak=0.95), subtype="FLOAT"))
    assert hot.warnings == ["hot.wav peaks at -0.4 dBFS, above -1 dBFS: aim for -3 dB peaks, never normalise to 0 dB"]
    clipped = np.clip(voice(12, peak=1.0) * 1.5, -1, 1)
    warnings = load_reference(write(tmp_path / "clip.wav", clipped, subtype="FLOAT")).warnings
    assert len(warnings) == 1 and warnings[0].startswith("clip.wav clips (") and "aim for -3 dB peaks" in warnings[0]


def test_long_reference_uses_first_30_s_unless_full(tmp_path):
    path = write(tmp_path / "long.flac", voice(45))
    default = load_reference(path)
    assert default.samples.size == int(LONG_REFERENCE_S * SAMPLE_RATE)
    assert default.warnings == ["long.flac is 45.0 s long; using the first 30 s (--full-reference uses up to 10:00)"]
    full = load_reference(path, full=True)
    assert full.samples.size == 45 * SAMPLE_RATE and "using all of it" in full.warnings[0]


def test_two_hour_file_is_truncated_or_refused_without_reading_it(tmp_path):
    rate = 8000
    path = tmp_path / "audiobook.flac"
    with sf.SoundFile(str(path), "w", rate, 1, "PCM_16", format="FLAC") as f:
        f.write(voice(40, rate=rate)[:, 0])
        for _ in range(12):
            f.write(np.zeros(600 * rate, np.float32))
    reference = load_reference(path)
    assert reference.samples.size == 30 * SAMPLE_RATE
    assert any("is 2:00:40 long; using the first 30 s" in w for w in reference.warnings)
    with pytest.raises(AudioError, match=r"audiobook\.flac is 2:00:40 long; references over 10:00 are refused"):
        load_reference(path, full=True)
    assert read_audio(path, max_seconds=1.0).samples.size == SAMPLE_RATE


def test_lossy_source_warns(tmp_path):
    path = tmp_path / "voice.ogg"
    sf.write(str(path), voice(12)[:, 0], SAMPLE_RATE, format="OGG", subtype="VORBIS")
    assert load_reference(path).warnings == ["voice.ogg is lossy (OGG VORBIS); a WAV or FLAC recording clones better"]


@pytest.mark.parametrize("name", ["out.wav", "out.flac"])
def test_write_round_trip(tmp_path, name):
    samples = voice(1)[:, 0]
    path = write_audio(tmp_path / "sub" / name, samples)
    back, rate = sf.read(str(path), dtype="float32")
    assert rate == SAMPLE_RATE and back.shape == samples.shape
    np.testing.assert_allclose(back, samples, atol=1 / 32768 + 1e-6)
    assert sorted(p.name for p in path.parent.iterdir()) == [name]


@pytest.mark.parametrize("name, fmt, quality", [("out.mp3", "MP3", 0.05), ("out.ogg", "OGG", 0.05)])
def test_write_lossy_round_trip(tmp_path, name, fmt, quality):
    """.mp3 and .ogg hold the audio sample-aligned and close to it (relative error under 5 %, where the encoders at
    their default level reach 3-9 % on speech); a slice shifted by one period of the test signal's 150 Hz is far."""
    samples = voice(2)[:, 0]
    path = write_audio(tmp_path / name, samples)
    back, rate = sf.read(str(path), dtype="float32")
    assert rate == SAMPLE_RATE and back.shape == samples.shape and sf.info(str(path)).format == fmt

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    assert rel(back, samples) < quality
    assert rel(back[147:], samples[:-147]) > 10 * quality  # negative control: misaligned by half a period
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_write_is_atomic_and_checks_the_format(tmp_path):
    def chunks():
        yield np.zeros(100, np.float32)
        raise RuntimeError("decoder failed")

    with pytest.raises(RuntimeError):
        write_audio_chunks(tmp_path / "partial.wav", chunks())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match=r"use a \.wav, \.flac, \.mp3 or \.ogg file name"):
        write_audio(tmp_path / "out.opus", np.zeros(10, np.float32))


def test_a_missing_encoder_is_refused_before_any_work(tmp_path, monkeypatch):
    """Some Linux builds of libsndfile have no MP3: the name is refused up front, not after a generation."""
    from runtime.audio import check_audio_output

    monkeypatch.setattr(sf, "check_format", lambda fmt, subtype: fmt != "MP3")
    with pytest.raises(InputError, match=r"cannot write out\.mp3: this libsndfile .* has no MP3 encoder"):
        check_audio_output(tmp_path / "out.mp3")
    check_audio_output(tmp_path / "out.ogg")  # negative control: the others still pass
