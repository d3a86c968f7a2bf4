"""`s2edge voice ...`: keep references by name (add from a recording, freeze a generated take, list, remove)."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from runtime.audio import FRAME_RATE
from runtime.codec import CodecConfig, validate_codes
from runtime.codec_cli import codec_config, codec_options, load_codes, open_codec, read_reference_audio
from runtime.voices import DEFAULT_LIBRARY, Voice, VoiceLibrary, recording_source

voices_dir_option = click.option(
    "--voices-dir", type=click.Path(path_type=Path), default=DEFAULT_LIBRARY, show_default=True,
    envvar="S2EDGE_VOICES", help="The voice library folder (or set S2EDGE_VOICES).")


@click.group()
def voice() -> None:
    """The voice library: references kept by name, used with `synthesize --voice NAME`.

    A voice holds the codec codes of a reference and its transcript, so the recording and the codec's encoder
    are needed only once. Example:

      s2edge voice add alice alice.wav --text "What Alice says in alice.wav."
      s2edge synthesize --voice alice --text "Hello." -o hello.wav
    """


@voice.command()
@click.argument("name")
@click.argument("audio", type=click.Path(path_type=Path))
@click.option("--text", "-t", required=True, help="Transcript of the recording, word for word.")
@click.option("--full-reference", is_flag=True, help="Use the whole recording up to 10 min instead of its first 30 s.")
@click.option("--replace", is_flag=True, help="Overwrite a voice of the same name.")
@voices_dir_option
@codec_options
def add(name: str, audio: Path, text: str, full_reference: bool, replace: bool, voices_dir: Path, codec_path: Path,
        config_name: str, device: str, precision: str) -> None:
    """Encode the recording AUDIO and keep it as the voice NAME (checks as `s2edge encode`)."""
    library = VoiceLibrary(voices_dir)
    library.path(name)  # a bad name fails before any work
    config = codec_config(config_name, codec_path)
    samples = read_reference_audio(audio, full_reference)
    codec = open_codec(codec_path, config, device, precision, with_encoder=True)
    codes = codec.encode(samples).cpu()
    stored = library.save(Voice(name, codes, text, recording_source(audio)), replace=replace)
    click.echo(f"voice '{name}': {stored.frames} frames ({stored.frames / FRAME_RATE:.1f} s) in {library.folder}")


@voice.command()
@click.argument("name")
@click.argument("codes", type=click.Path(path_type=Path))
@click.option("--text", "-t", required=True, help="What the take says (the text it was generated from).")
@click.option("--replace", is_flag=True, help="Overwrite a voice of the same name.")
@click.option("--codec-config", default="s2pro", show_default=True,
              help="Codec layout the codes follow: 's2pro', 'tiny' (tests) or a codec config .json.")
@voices_dir_option
def freeze(name: str, codes: Path, text: str, replace: bool, codec_config: str, voices_dir: Path) -> None:
    """Keep a generated take (CODES: the .npy `synthesize` writes beside its audio) as the permanent voice NAME.

    A take you like becomes the reference for later runs, so the voice stays the same from one run to the next.
    """
    library = VoiceLibrary(voices_dir)
    library.path(name)
    array = load_codes(codes)
    validate_codes(array, CodecConfig.load(codec_config))
    source = f"take {codes.name}"
    stored = library.save(Voice(name, torch.from_numpy(array.astype("int64")), text, source), replace=replace)
    click.echo(f"voice '{name}': {stored.frames} frames ({stored.frames / FRAME_RATE:.1f} s) frozen from {codes}")


@voice.command(name="list")
@voices_dir_option
def list_voices(voices_dir: Path) -> None:
    """List the voices: name, length, where they came from, the start of the transcript."""
    library = VoiceLibrary(voices_dir)
    names = library.names()
    if not names:
        click.echo(f"no voices in {library.folder}")
        return
    for name in names:
        v = library.load(name)
        text = v.text if len(v.text) <= 48 else v.text[:45] + "..."
        click.echo(f"{name:20s} {v.frames / FRAME_RATE:6.1f} s  {v.created:25s}  {v.source.split(' sha256:')[0]:30s}  "
                   f"{text}")


@voice.command()
@click.argument("name")
@voices_dir_option
def remove(name: str, voices_dir: Path) -> None:
    """Delete the voice NAME from the library."""
    VoiceLibrary(voices_dir).remove(name)
    click.echo(f"removed voice '{name}'")
