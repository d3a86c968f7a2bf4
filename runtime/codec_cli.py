"""`s2edge encode` and `s2edge decode`: reference audio -> codes .npy, codes .npy -> wav/flac."""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np
import torch

from runtime.audio import check_audio_output, load_reference
from runtime.codec import (DECODE_CHUNK_FRAMES, Codec, CodecConfig, check_layout, decode_to_file, detect_config,
                           load_codec, validate_codes)
from runtime.codec_checkpoint import read_checkpoint
from runtime.errors import InputError
from runtime.files import atomic_path, check_output
from runtime.loader import resolve_device

DEFAULT_CODEC = Path("checkpoints/s2-pro/codec.pth")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CODEC_CONFIG_HELP = ("Codec architecture: 'auto' (the bundled one the checkpoint's shapes match), 's2pro', 'tiny' "
                     "(tests) or a path to a codec config .json.")

_codec_options = [
    click.option("--codec", "codec_path", type=click.Path(path_type=Path), default=DEFAULT_CODEC, show_default=True,
                 help="The codec checkpoint (codec.pth of fishaudio/s2-pro), read unchanged."),
    click.option("--codec-config", "config_name", default="auto", show_default=True, help=CODEC_CONFIG_HELP),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    click.option("--precision", type=click.Choice(["auto", *PRECISIONS]), default="auto", show_default=True,
                 help="Codec precision; auto is bf16 on a GPU and fp32 on the CPU."),
]


def codec_options(command):
    """The options shared by encode and decode."""
    for option in reversed(_codec_options):
        command = option(command)
    return command


def codec_config(name: str, codec_path: Path) -> CodecConfig:
    """--codec-config for `codec_path`: a bundled name or a .json path, or 'auto': the bundled one the checkpoint
    fits. Opens the checkpoint (memory-mapped, no data read) and checks its shapes, so a missing, unreadable or
    mismatched codec.pth fails here, before any other work."""
    tensors = read_checkpoint(codec_path)
    if name == "auto":
        return detect_config(tensors, codec_path)
    config = CodecConfig.load(name)
    check_layout(config, tensors, codec_path)
    return config


def codec_dtype(target: torch.device, precision: str) -> torch.dtype:
    """--precision of the codec: auto is bf16 on a GPU and fp32 on the CPU."""
    return PRECISIONS["bf16" if target.type == "cuda" else "fp32"] if precision == "auto" else PRECISIONS[precision]


def open_codec(codec_path: Path, config: CodecConfig, device: str, precision: str, with_encoder: bool) -> Codec:
    target = resolve_device(device)
    return load_codec(codec_path, config, target, codec_dtype(target, precision), with_encoder)


def save_codes(path: Path, codes: np.ndarray) -> None:
    """Write codes [10, T] as an int64 .npy file, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, codes.astype(np.int64))


# The first bytes of the audio files a user may pass where codes are expected
AUDIO_MAGIC = (b"RIFF", b"fLaC", b"OggS", b"ID3", b"FORM", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")
NPY_MAGIC = b"\x93NUMPY"


def holds_codes(path: Path) -> bool:
    """Whether `path` is a .npy file (codes) rather than audio, by its first bytes whatever its name; a file that
    cannot be opened counts as codes if named .npy, so that the reader of its kind reports the problem."""
    try:
        with open(path, "rb") as f:
            return f.read(len(NPY_MAGIC)) == NPY_MAGIC
    except OSError:
        return path.suffix.lower() == ".npy"


def read_reference_audio(path: Path, full: bool) -> np.ndarray:
    """The samples of a reference recording, checked against the recording guide; its warnings are printed."""
    reference = load_reference(path, full=full)
    for warning in reference.warnings:
        click.echo(f"warning: {warning}", err=True)
    return reference.samples


def load_codes(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: codes file not found") from None
    except (OSError, ValueError) as e:
        if _looks_like_audio(path):
            raise InputError(f"{path} is audio, not codes: make its codes with "
                             f"`s2edge encode {path} -o codes.npy`") from None
        raise InputError(f"{path}: not a readable .npy file ({e})") from None


def _looks_like_audio(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4).startswith(AUDIO_MAGIC)
    except OSError:
        return False


@click.command()
@click.argument("audio", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Where to write the codes: .npy, int64 [10, T], 21.5 frames per second.")
@click.option("--full-reference", is_flag=True,
              help="Use the whole recording up to 10 min instead of its first 30 s.")
@codec_options
def encode(audio: Path, output: Path, full_reference: bool, codec_path: Path, config_name: str, device: str,
           precision: str) -> None:
    """Encode the reference recording AUDIO into codec codes for voice cloning.

    AUDIO is any file libsndfile reads (wav, flac, ogg, mp3, aiff...): it is mixed to mono and resampled to
    44.1 kHz. The recording guide is checked: 3 s is the minimum, 10-30 s of one clean voice works best, peaks
    should sit near -3 dBFS; problems are printed as warnings. Only the first 30 s are used unless
    --full-reference is given.

    Example: s2edge encode voice.wav -o voice.npy
    """
    check_output(output, (".npy",))
    config = codec_config(config_name, codec_path)  # a missing or foreign codec.pth fails before the audio is read
    samples = read_reference_audio(audio, full_reference)
    codec = open_codec(codec_path, config, device, precision, with_encoder=True)
    start = time.perf_counter()
    codes = codec.encode(samples).cpu().numpy()
    elapsed = time.perf_counter() - start
    save_codes(output, codes)
    seconds = samples.size / codec.config.sample_rate
    click.echo(f"wrote {output}: codes [{codes.shape[0]}, {codes.shape[1]}] from {seconds:.2f} s of audio "
               f"in {elapsed:.2f} s on {codec.device}")


@click.command()
@click.argument("codes", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Where to write the audio: .wav or .flac (16-bit), .mp3 or .ogg (Vorbis); 44.1 kHz, mono.")
@click.option("--chunk-frames", type=click.IntRange(min=1), default=DECODE_CHUNK_FRAMES, show_default=True,
              help="Frames decoded at a time: bounds memory; every value gives the same audio.")
@codec_options
def decode(codes: Path, output: Path, chunk_frames: int, codec_path: Path, config_name: str, device: str,
           precision: str) -> None:
    """Decode CODES (.npy, integers [10, T], as written by `encode` or `synthesize`) into 44.1 kHz audio.

    Only the decoding half of the codec is loaded (about 0.18 B parameters). Values above a codebook's size
    are clamped as the reference does; negative values are an error.

    Example: s2edge decode output.npy -o output.wav
    """
    check_audio_output(output)
    array = load_codes(codes)
    config = codec_config(config_name, codec_path)
    validate_codes(array, config)  # fail before loading weights
    codec = open_codec(codec_path, config, device, precision, with_encoder=False)
    start = time.perf_counter()
    decode_to_file(array, codec, output, chunk_frames)
    elapsed = time.perf_counter() - start
    seconds = array.shape[1] * config.frame_length / config.sample_rate
    click.echo(f"wrote {output}: {seconds:.2f} s of audio in {elapsed:.2f} s on {codec.device}")
