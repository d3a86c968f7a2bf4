"""Audio in and out: read whatever libsndfile reads (wav, flac, ogg, mp3, aiff...), mix to mono, resample
to 44.1 kHz with soxr, check a voice reference against the recording guide, write wav/flac atomically.

Reference checks return warnings as strings (the CLI prints them) and raise AudioError for audio that cannot
work. Files are read only up to the length that will be used, so a long recording never fills memory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np
import soundfile as sf
import soxr

from runtime.errors import AudioError, InputError
from runtime.files import atomic_path, check_output

SAMPLE_RATE = 44100
FRAME_RATE = SAMPLE_RATE / 2048  # S2 Pro codec frames per second of audio (21.5)
MIN_REFERENCE_S = 3.0  # below: refused
SHORT_REFERENCE_S = 10.0  # below: warned
LONG_REFERENCE_S = 30.0  # above: warned, and only the first 30 s are used unless asked otherwise
LONGEST_AUDIO_S = 600.0  # never read more than this; a longer full reference is refused
PEAK_WARN = 10 ** (-1 / 20)  # -1 dBFS
FULL_SCALE = 0.999
SILENCE = 10 ** (-60 / 20)  # a peak below -60 dBFS is silence (or a broken input chain)
LOSSY_SUBTYPES = {"MPEG_LAYER_I", "MPEG_LAYER_II", "MPEG_LAYER_III", "VORBIS", "OPUS"}
UNSUPPORTED = {".m4a", ".aac", ".mp4", ".wma", ".webm", ".amr"}
# suffix -> libsndfile (format, subtype); the lossy ones at libsndfile's highest quality (compression level 0:
# about 90 kbps MP3 and 120 kbps Vorbis for a speech recording, sample-aligned with the input)
WRITE_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".mp3": ("MP3", "MPEG_LAYER_III"),
                 ".ogg": ("OGG", "VORBIS")}


@dataclass(frozen=True)
class AudioClip:
    """The start of an audio file, as the codec wants it."""

    samples: np.ndarray  # [N] float32, mono, SAMPLE_RATE
    source_rate: int
    channels: int
    source_seconds: float  # the whole file, also when only its start was read
    peak: float  # largest |sample| over all source channels, before mixing
    full_scale_samples: int  # source samples at |x| >= 0.999 (clipping)
    lossy: bool


@dataclass(frozen=True)
class Reference:
    """A voice reference ready to encode, with what the recording guide would say about it."""

    samples: np.ndarray  # [N] float32, mono, SAMPLE_RATE
    warnings: list[str]


def _clock(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def audio_info(path: str | Path) -> sf._SoundFileInfo:
    """libsndfile's view of a file, or AudioError saying why it cannot be read or is empty."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file not found: {path}")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as e:
        hint = (f"{path.suffix} is not supported" if path.suffix.lower() in UNSUPPORTED
                else str(e).splitlines()[0])
        raise AudioError(f"cannot read {path} ({hint}); convert it to WAV or FLAC, "
                         f"e.g. ffmpeg -i '{path.name}' -ar 44100 out.wav") from e
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(f"{path} contains no audio (0 samples)")
    return info


def read_audio(path: str | Path, max_seconds: float = LONGEST_AUDIO_S) -> AudioClip:
    """Read at most `max_seconds` from the start of `path`, mix to mono, resample to 44.1 kHz."""
    path = Path(path)
    info = audio_info(path)
    frames = min(info.frames, int(max_seconds * info.samplerate))
    try:
        data, rate = sf.read(str(path), frames=frames, dtype="float32", always_2d=True)  # [n, channels]
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError(f"cannot read {path}: {str(e).splitlines()[0]}") from e
    if data.size == 0:
        raise AudioError(f"{path} contains no audio (0 samples)")
    if not np.isfinite(data).all():
        raise AudioError(f"{path} contains NaN or infinite samples")
    magnitude = np.abs(data)
    mono = data.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
    return AudioClip(samples=np.ascontiguousarray(mono), source_rate=rate, channels=data.shape[1],
                     source_seconds=info.frames / info.samplerate, peak=float(magnitude.max()),
                     full_scale_samples=int((magnitude >= FULL_SCALE).sum()),
                     lossy=info.subtype in LOSSY_SUBTYPES or info.format == "MP3")


def load_reference(path: str | Path, full: bool = False) -> Reference:
    """Read a voice reference and check it against the recording guide.

    Errors (AudioError): unreadable, empty, NaN, silent, shorter than 3 s, or longer than 10 min with
    `full`. Warnings: under 10 s, over 30 s (only the first 30 s are used unless `full`), sample rate under
    44.1 kHz, peaks above -1 dBFS or clipping, more than 2 channels, lossy formats.
    """
    path = Path(path)
    info = audio_info(path)
    seconds = info.frames / info.samplerate
    if seconds < MIN_REFERENCE_S:
        raise AudioError(f"{path} is {seconds:.1f} s long; a reference needs at least {MIN_REFERENCE_S:.0f} s "
                         f"of speech (10-30 s is best)")
    if full and seconds > LONGEST_AUDIO_S:
        raise AudioError(f"{path} is {_clock(seconds)} long; references over {_clock(LONGEST_AUDIO_S)} are "
                         f"refused: cut 10-30 s of clean speech from it")
    clip = read_audio(path, LONGEST_AUDIO_S if full else LONG_REFERENCE_S)
    if clip.peak < SILENCE:
        raise AudioError(f"{path} is silent (peak below -60 dBFS); speech should peak near -3 dBFS")
    name = path.name
    warnings = []
    if seconds < SHORT_REFERENCE_S:
        warnings.append(f"{name} is only {seconds:.1f} s long; 10-30 s of speech clones the voice better")
    if seconds > LONG_REFERENCE_S:
        warnings.append(f"{name} is {_clock(seconds)} long; using all of it as asked" if full else
                        f"{name} is {_clock(seconds)} long; using the first {LONG_REFERENCE_S:.0f} s "
                        f"(--full-reference uses up to {_clock(LONGEST_AUDIO_S)})")
    if clip.source_rate < SAMPLE_RATE:
        warnings.append(f"{name} is sampled at {clip.source_rate} Hz, below 44.1 kHz: upsampled, it has nothing "
                        f"above {clip.source_rate / 2000:g} kHz; record at 44.1 kHz or more")
    if clip.full_scale_samples:
        warnings.append(f"{name} clips ({clip.full_scale_samples} samples at full scale): aim for -3 dB peaks, "
                        f"never normalise to 0 dB")
    elif clip.peak > PEAK_WARN:
        warnings.append(f"{name} peaks at {20 * np.log10(clip.peak):.1f} dBFS, above -1 dBFS: aim for -3 dB "
                        f"peaks, never normalise to 0 dB")
    if clip.channels > 2:
        warnings.append(f"{name} has {clip.channels} channels, mixed to mono; a mono recording of one voice "
                        f"works best")
    if clip.lossy:
        warnings.append(f"{name} is lossy ({info.format} {info.subtype}); a WAV or FLAC recording clones better")
    return Reference(samples=clip.samples, warnings=warnings)


def check_audio_output(path: Path) -> None:
    """Fail before any work if `path` cannot take the audio: a name other than .wav, .flac, .mp3 or .ogg, an encoder
    this libsndfile lacks (some Linux builds have no MP3), or no place to write."""
    check_output(path, tuple(WRITE_FORMATS))
    fmt, subtype = WRITE_FORMATS[path.suffix.lower()]
    if not sf.check_format(fmt, subtype):
        raise InputError(f"cannot write {path.name}: this libsndfile ({sf.__libsndfile_version__}) has no {fmt} "
                         f"encoder; use a .wav or .flac file name")


def write_audio_chunks(path: str | Path, chunks: Iterable[np.ndarray], sample_rate: int = SAMPLE_RATE) -> Path:
    """Write mono float chunks as one .wav or .flac (16-bit), .mp3 or .ogg (Vorbis) file; the file appears only once
    complete."""
    path = Path(path)
    check_audio_output(path)
    fmt, subtype = WRITE_FORMATS[path.suffix.lower()]
    quality = {"compression_level": 0.0} if subtype in LOSSY_SUBTYPES else {}
    with atomic_path(path) as tmp, sf.SoundFile(str(tmp), "w", sample_rate, 1, subtype, format=fmt,
                                                **quality) as out:
        for chunk in chunks:
            out.write(np.clip(np.asarray(chunk, dtype=np.float32).reshape(-1), -1.0, 1.0))
    return path


def write_audio(path: str | Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write mono float samples [N] as an audio file (write_audio_chunks), atomically."""
    return write_audio_chunks(path, [samples], sample_rate)


class WavPipe:
    """16-bit mono WAV written to a stream (a pipe to a player) as the audio is made. A pipe cannot seek back to
    fill in the sizes, so the header gives both as 0xFFFFFFFF, the usual mark of a stream whose end is the end of
    the data (libsndfile reads it so). Samples become 16-bit as libsndfile 1.2 writes PCM_16 (floor of x * 32768,
    clipped), so the stream holds the samples a .wav of the same audio would."""

    UNKNOWN = 0xFFFFFFFF

    def __init__(self, out: BinaryIO, sample_rate: int = SAMPLE_RATE) -> None:
        self.out = out
        fmt = struct.pack("<HHIIHH", 1, 1, sample_rate, 2 * sample_rate, 2, 16)  # PCM, mono, 2 bytes per sample
        out.write(b"RIFF" + struct.pack("<I", self.UNKNOWN) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
                  + b"data" + struct.pack("<I", self.UNKNOWN))
        out.flush()

    def write(self, samples: np.ndarray) -> None:
        """Mono float samples [N] in [-1, 1] (clipped)."""
        pcm = np.floor(np.asarray(samples, dtype=np.float32).reshape(-1) * np.float32(32768.0))
        self.out.write(np.clip(pcm, -32768, 32767).astype("<i2").tobytes())
        self.out.flush()
