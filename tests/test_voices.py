"""The voice library: files, checks, the `voice` commands and `synthesize --voice`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from runtime.cli import main
from runtime.codec import CodecConfig
from runtime.errors import InputError
from runtime.synthetic_codec import write_synthetic_codec
from runtime.voices import Voice, VoiceLibrary

FIXTURE = Path(__file__).parent / "fixtures" / "librivox_sense_and_sensibility_0870.wav"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _codes(frames: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (10, frames), generator=torch.Generator().manual_seed(seed))


def test_save_load_round_trip_and_listing(tmp_path):
    library = VoiceLibrary(tmp_path / "voices")
    assert library.names() == []
    codes = _codes()
    stored = library.save(Voice("bob", codes, "Bob speaks.", "take out.npy"))
    library.save(Voice("alice-2.v1", _codes(5, 1), "Alice.", "recording a.wav sha256:00"))
    assert library.names() == ["alice-2.v1", "bob"]
    loaded = library.load("bob", num_codebooks=10, codebook_size=64)
    assert torch.equal(loaded.codes, codes) and loaded.codes.dtype == torch.int64
    assert (loaded.text, loaded.source, loaded.created) == ("Bob speaks.", "take out.npy", stored.created)
    assert loaded.reference().text == "Bob speaks." and loaded.frames == 12
    library.remove("bob")
    assert library.names() == ["alice-2.v1"]
    with pytest.raises(InputError, match="no voice 'bob'.*voices: alice-2.v1"):
        library.load("bob")


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "x" * 65, "spa ce"])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(InputError, match="not a valid voice name"):
        VoiceLibrary(tmp_path).save(Voice(name, _codes(), "text", "take"))


def test_no_silent_overwrite_and_no_empty_transcript(tmp_path):
    library = VoiceLibrary(tmp_path)
    library.save(Voice("v", _codes(4), "one", "take"))
    with pytest.raises(InputError, match="already exists"):
        library.save(Voice("v", _codes(6), "two", "take"))
    assert library.load("v").frames == 4
    library.save(Voice("v", _codes(6), "two", "take"), replace=True)
    assert library.load("v").frames == 6
    with pytest.raises(InputError, match="transcript is empty"):
        library.save(Voice("w", _codes(), "  ", "take"))


def test_damaged_or_foreign_files_are_named_errors(tmp_path):
    library = VoiceLibrary(tmp_path)
    library.save(Voice("ok", _codes(), "text", "take"))
    data = library.path("ok").read_bytes()
    library.path("cut").write_bytes(data[:-7])
    library.path("junk").write_bytes(b"\x00" * 3)
    for name, message in (("cut", "truncated"), ("junk", "truncated or not a safetensors")):
        with pytest.raises(InputError, match=rf"voice '{name}' .* is unreadable: .*{message}"):
            library.load(name)
    with pytest.raises(InputError, match=r"voice 'ok': values must lie in \[0, 31\]"):
        library.load("ok", num_codebooks=10, codebook_size=32)  # codes of a model with larger codebooks


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    import runtime.safetensors_io as io

    library = VoiceLibrary(tmp_path)

    def broken(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(io.struct, "pack", broken)
    with pytest.raises(OSError):
        library.save(Voice("v", _codes(), "text", "take"))
    assert library.names() == [] and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_codec(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("codec") / "codec.pth"
    write_synthetic_codec(path, CodecConfig.load("tiny"))
    return path


def synth(ckpt, out, *extra):
    return run("synthesize", "--checkpoint", ckpt, "--text", "hello there", "--codes-out", out, "--top-k", "1",
               "--precision", "fp32", "--device", "cpu", "--max-new-tokens", "20", "--seed", "0", *extra)


def test_voice_commands_and_synthesize_with_a_voice(tiny_checkpoint, tiny_codec, tmp_path):
    lib = tmp_path / "lib"
    added = run("voice", "add", "reader", FIXTURE, "--text", "A reading.", "--voices-dir", lib, "--codec", tiny_codec,
                "--codec-config", "tiny", "--device", "cpu")
    assert added.exit_code == 0, added.output
    listed = run("voice", "list", "--voices-dir", lib)
    assert "reader" in listed.stdout and "recording librivox_sense_and_sensibility_0870.wav" in listed.stdout

    voice = VoiceLibrary(lib).load("reader")
    assert voice.codes.shape[0] == 10 and voice.source.startswith("recording ") and "sha256:" in voice.source
    spoken = synth(tiny_checkpoint, tmp_path / "r.npy", "--voice", "reader", "--voices-dir", lib)
    assert spoken.exit_code == 0, spoken.output
    # codes from books larger than the model's 64 codes (frozen for the full-size codec): a clear error, not garbage
    np.save(tmp_path / "wide.npy", _codes().numpy() * 16)
    wide = run("voice", "freeze", "wide", tmp_path / "wide.npy", "--text", "Wide.", "--voices-dir", lib,
               "--codec-config", "s2pro")
    assert wide.exit_code == 0, wide.output
    mismatch = synth(tiny_checkpoint, tmp_path / "x.npy", "--voice", "wide", "--voices-dir", lib)
    assert mismatch.exit_code == 2 and "voice 'wide': values must lie in [0, 63]" in mismatch.output

    # a voice gives the same prompt, hence the same greedy codes, as passing its codes and transcript by hand
    np.save(tmp_path / "calm.npy", _codes(30, 3).numpy())
    made = run("voice", "freeze", "calm", tmp_path / "calm.npy", "--text", "Calm words.", "--voices-dir", lib,
               "--codec-config", "tiny")
    assert made.exit_code == 0, made.output
    by_voice = synth(tiny_checkpoint, tmp_path / "a.npy", "--voice", "calm", "--voices-dir", lib)
    by_hand = synth(tiny_checkpoint, tmp_path / "b.npy", "-r", tmp_path / "calm.npy", "--reference-text",
                    "Calm words.")
    plain = synth(tiny_checkpoint, tmp_path / "c.npy")
    assert by_voice.exit_code == 0 and by_hand.exit_code == 0, by_voice.output + by_hand.output
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    tokens = [int(r.stdout.split("prompt ")[1].split(" tokens")[0]) for r in (by_voice, plain)]
    assert tokens[0] > tokens[1] + 30  # the reference is in the prompt (negative control: without it)

    # freeze the generated take as a permanent voice, then clone from it
    frozen = run("voice", "freeze", "take1", tmp_path / "a.npy", "--text", "hello there", "--voices-dir", lib,
                 "--codec-config", "tiny")
    assert frozen.exit_code == 0, frozen.output
    assert np.array_equal(VoiceLibrary(lib).load("take1").codes.numpy(), np.load(tmp_path / "a.npy"))
    again = synth(tiny_checkpoint, tmp_path / "d.npy", "--voice", "take1", "--voice", "calm", "--voices-dir", lib)
    assert again.exit_code == 0, again.output

    assert run("voice", "remove", "take1", "--voices-dir", lib).exit_code == 0
    assert "take1" not in run("voice", "list", "--voices-dir", lib).stdout


@pytest.mark.parametrize("args, message", [
    (["voice", "remove", "ghost"], "no voice 'ghost'"),
    (["voice", "freeze", "../x", "codes.npy", "--text", "t"], "not a valid voice name"),
    (["voice", "freeze", "v", "missing.npy", "--text", "t"], "codes file not found"),
])
def test_voice_errors_are_one_line(tmp_path, args, message):
    result = run(*args, "--voices-dir", tmp_path)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_synthesize_with_an_unknown_voice(tiny_checkpoint, tmp_path):
    result = synth(tiny_checkpoint, tmp_path / "o.npy", "--voice", "nobody", "--voices-dir", tmp_path)
    assert result.exit_code == 2 and "no voice 'nobody'" in result.output


def test_a_library_folder_that_cannot_be_written_is_one_line(tmp_path):
    """The file system's refusal (here: a file where a folder should be) is an error line, not a traceback."""
    codes = tmp_path / "take.npy"
    np.save(codes, np.zeros((10, 4), np.int64))
    (tmp_path / "file").write_bytes(b"x")
    result = CliRunner().invoke(main, ["voice", "freeze", "calm", str(codes), "--text", "hello",
                                       "--voices-dir", str(tmp_path / "file" / "voices")])
    assert result.exit_code == 2 and result.stderr.startswith("error: Not a directory"), result.output
    assert "Traceback" not in result.output
    debug = CliRunner().invoke(main, ["--debug", "voice", "freeze", "calm", str(codes), "--text", "hello",
                                      "--voices-dir", str(tmp_path / "file" / "voices")])
    assert isinstance(debug.exception, NotADirectoryError)
