"""The s2edge command line on a tiny synthetic checkpoint: determinism, outputs, one-line errors."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from runtime.cli import main


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def synth(ckpt, out, *extra):
    return run("synthesize", "-c", ckpt, "-t", "hello there", "--top-k", "1", "--precision", "fp32",
               "--device", "cpu", "--max-new-tokens", "40", "--codes-out", out, *extra)


def test_synthesize_is_deterministic_with_top_k_1(tiny_checkpoint, tmp_path):
    first, second = synth(tiny_checkpoint, tmp_path / "a.npy"), synth(tiny_checkpoint, tmp_path / "b.npy")
    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape[0] == 10 and 0 < a.shape[1] <= 40
    assert np.array_equal(a, b)
    assert a.min() >= 0 and a.max() < 64
    assert "codes [10," in first.stdout


def test_no_cuda_graph_flag_reaches_the_generation_config(tiny_checkpoint, tmp_path, monkeypatch):
    from runtime import speaker

    seen = []
    real = speaker.generate_batches
    monkeypatch.setattr(speaker, "generate_batches", lambda *a, **k: seen.append(a[4].cuda_graph) or real(*a, **k))
    assert synth(tiny_checkpoint, tmp_path / "a.npy").exit_code == 0
    assert synth(tiny_checkpoint, tmp_path / "b.npy", "--no-cuda-graph").exit_code == 0
    assert seen == [True, False]


def test_synthesize_keeps_within_max_context(tiny_checkpoint, tmp_path):
    """--max-context is the KV the plan reserved: frames are capped to fit it, and a prompt that fills it is a
    one-line error."""
    prompt_tokens = int(synth(tiny_checkpoint, tmp_path / "a.npy").stdout.split("prompt ")[1].split(" tokens")[0])
    capped = synth(tiny_checkpoint, tmp_path / "b.npy", "--max-context", str(prompt_tokens + 3))
    assert capped.exit_code == 0, capped.output
    assert f"at most 3 frames fit in --max-context {prompt_tokens + 3}" in capped.stderr
    assert np.load(tmp_path / "b.npy").shape[1] <= 3
    full = synth(tiny_checkpoint, tmp_path / "c.npy", "--max-context", str(prompt_tokens))
    assert full.exit_code != 0 and "raise --max-context" in full.stderr and "Traceback" not in full.output


def test_synthesize_speaks_long_text_in_batches(tiny_checkpoint, tmp_path):
    text = "A first sentence here. A second one there. And a third to finish."
    result = synth(tiny_checkpoint, tmp_path / "long.npy", "--text", text, "--chunk-length", "25")
    assert result.exit_code == 0, result.output
    assert "3 text batches" in result.stdout
    one = synth(tiny_checkpoint, tmp_path / "one.npy", "--text", text)
    assert "text batches" not in one.stdout  # negative control: the default chunk length keeps it whole
    assert np.load(tmp_path / "long.npy").shape[0] == 10


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_each_line_is_a_take_of_its_own_from_one_load(device, tiny_checkpoint, tmp_path, monkeypatch):
    """--each-line: every non-empty line is spoken as a separate run of it would be (greedy, same seed), into
    numbered files, with the model loaded once and the decode-only codec loaded once (on a GPU: the CUDA graph of
    the first take replayed by the others, and the codec loaded on a thread of its own while the model loads)."""
    import threading

    from runtime import cli
    from runtime.codec import CodecConfig
    from runtime.synthetic_codec import write_synthetic_codec

    codec = write_synthetic_codec(tmp_path / "codec.pth", CodecConfig.load("tiny"))
    (tmp_path / "lines.txt").write_text("First line here.\n\n  Second, a little longer line.  \nThird.\n")
    loads, opens = [], []
    real_load, real_open = cli.load_model, cli.open_codec
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: loads.append(k["sampling"].top_k) or real_load(*a, **k))
    monkeypatch.setattr(cli, "open_codec",
                        lambda *a, **k: opens.append(threading.current_thread().name) or real_open(*a, **k))
    from runtime import speaker
    from runtime.codec import Codec

    events, real_generate, real_warm_up = [], speaker.generate_batches, Codec.warm_up
    monkeypatch.setattr(Codec, "warm_up", lambda codec: (real_warm_up(codec), events.append("warmed up")))
    monkeypatch.setattr(speaker, "generate_batches",
                        lambda *a, **k: events.append("generating") or real_generate(*a, **k))
    out, precision = tmp_path / "takes", "fp32" if device == "cpu" else "bf16"

    def from_file(codes, *extra):
        return run("synthesize", "-c", tiny_checkpoint, "--text-file", tmp_path / "lines.txt", "--each-line",
                   "--top-k", "1", "--precision", precision, "--device", device, "--max-new-tokens", "40",
                   "--codes-out", codes, *extra)

    result = from_file(out / "take.npy", "-o", out / "take.flac", "--codec", codec, "--seed", "0")
    assert result.exit_code == 0, result.output
    assert loads == [1] and len(opens) == 1  # one load, told the --top-k its draws compile for and (opens[0] == "MainThread") == (device == "cpu"), opens
    # on a GPU the codec's thread is done before the frame loop (and its graph capture) begins
    assert events == ["warmed up"] * (device == "cuda") + ["generating"] * 3
    assert sorted(p.name for p in out.iterdir()) == [f"take-000{i}.{ext}" for i in (1, 2, 3) for ext in ("flac", "npy")]
    for i, line in enumerate(["First line here.", "Second, a little longer line.", "Third."], 1):
        alone = run("synthesize", "-c", tiny_checkpoint, "--text", line, "--top-k", "1", "--precision", precision,
                    "--device", device, "--max-new-tokens", "40", "--codes-out", tmp_path / f"alone{i}.npy",
                    "--seed", "0")
        assert alone.exit_code == 0, alone.output
        assert np.array_equal(np.load(out / f"take-000{i}.npy"), np.load(tmp_path / f"alone{i}.npy")), line
    assert not np.array_equal(np.load(out / "take-0001.npy"), np.load(out / "take-0002.npy"))  # the lines differ
    streamed = from_file(out / "x.npy", "-o", "-")
    assert streamed.exit_code == 2 and "--each-line writes a file per line" in streamed.stderr


def test_the_codec_prepared_beside_the_load_is_warm_or_raises_its_error(tmp_path):
    """The decode-only codec is opened and warmed up on its own thread; what fails there is raised by result()."""
    import threading

    from runtime.cli import _beside_the_load
    from runtime.codec import CodecConfig, load_codec
    from runtime.errors import InputError
    from runtime.synthetic_codec import write_synthetic_codec

    path = write_synthetic_codec(tmp_path / "codec.pth", CodecConfig.load("tiny"))
    where, warmed = [], []

    def open_decoder():
        where.append(threading.current_thread().name)
        codec = load_codec(path, CodecConfig.load("tiny"), with_encoder=False)
        codec.warm_up = lambda: warmed.append(1)
        return codec

    assert _beside_the_load(open_decoder).result(timeout=60).encoder is None
    assert warmed == [1] and where[0].startswith("s2edge-codec")

    def broken():
        raise InputError("codec.pth: truncated")

    with pytest.raises(InputError, match="truncated"):
        _beside_the_load(broken).result(timeout=60)


@pytest.mark.parametrize("failure", [KeyboardInterrupt, MemoryError])
def test_a_long_text_stopped_midway_keeps_the_batches_spoken(tiny_checkpoint, tmp_path, monkeypatch, failure):
    """Ctrl-C or an error in batch 3 of 3: the codes of batches 1-2 are written, as the whole run wrote them, and
    the command still fails."""
    from runtime import engine

    real, calls = engine.generate, []

    def generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise (KeyboardInterrupt() if failure is KeyboardInterrupt else MemoryError())
        return real(*args, **kwargs)

    text = "A first sentence here. A second one there. And a third to finish."
    whole = synth(tiny_checkpoint, tmp_path / "whole.npy", "--text", text, "--chunk-length", "25")
    assert whole.exit_code == 0 and "3 text batches" in whole.stdout
    monkeypatch.setattr(engine, "generate", generate)
    cut = synth(tiny_checkpoint, tmp_path / "cut.npy", "--text", text, "--chunk-length", "25")
    assert cut.exit_code != 0 and "stopped in text batch 3 of 3" in cut.stderr
    done = np.load(tmp_path / "cut.npy")
    assert done.shape[1] > 0 and np.array_equal(done, np.load(tmp_path / "whole.npy")[:, :done.shape[1]])


def test_synthesize_with_two_references(tiny_checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    for k in range(2):
        np.save(tmp_path / f"r{k}.npy", rng.integers(0, 64, size=(10, 5 + k)))
    result = synth(tiny_checkpoint, tmp_path / "o.npy", "-r", tmp_path / "r0.npy", "--reference-text", "one",
                   "-r", tmp_path / "r1.npy", "--reference-text", "two", "--top-k", "30", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "o.npy").shape[0] == 10


@pytest.fixture(scope="module")
def tiny_codec(tmp_path_factory):
    """The tiny codec (its books hold the tiny model's 64 codes, so that its codes can prompt the model): (codec.pth,
    its --codec-config)."""
    from runtime.codec import CodecConfig
    from runtime.synthetic_codec import write_synthetic_codec

    return write_synthetic_codec(tmp_path_factory.mktemp("codec") / "codec.pth", CodecConfig.load("tiny")), "tiny"


RECORDING = "tests/fixtures/librivox_sense_and_sensibility_0870.wav"


def test_synthesize_clones_from_a_recording_as_from_its_codes(tiny_checkpoint, tiny_codec, tmp_path):
    """-r takes a recording or its codes: the recording is encoded first and prompts the model exactly as the codes
    `s2edge encode` makes of it, alone or beside a codes file."""
    codec, config = tiny_codec
    with_codec = ("--codec", codec, "--codec-config", config)
    encoded = run("encode", RECORDING, "-o", tmp_path / "ref.npy", *with_codec, "--device", "cpu")
    assert encoded.exit_code == 0, encoded.output
    text = ("--reference-text", "A reading.")
    by_codes = synth(tiny_checkpoint, tmp_path / "a.npy", "-r", tmp_path / "ref.npy", *text)
    by_audio = synth(tiny_checkpoint, tmp_path / "b.npy", "--reference", RECORDING, *text, *with_codec)
    plain = synth(tiny_checkpoint, tmp_path / "c.npy")
    assert by_codes.exit_code == 0 and by_audio.exit_code == 0, by_codes.output + by_audio.output
    assert "encoded tests/fixtures/librivox_sense_and_sensibility_0870.wav" in by_audio.stderr
    assert "encoded" not in by_codes.stderr
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    tokens = [int(r.stdout.split("prompt ")[1].split(" tokens")[0]) for r in (by_audio, plain)]
    assert tokens[0] > tokens[1] + 30  # the encoded recording is in the prompt (negative control: without it)

    mixed = synth(tiny_checkpoint, tmp_path / "d.npy", "-r", tmp_path / "ref.npy", *text, "-r", RECORDING, *text,
                  *with_codec)
    twice = synth(tiny_checkpoint, tmp_path / "e.npy", "-r", tmp_path / "ref.npy", *text, "-r", tmp_path / "ref.npy",
                  *text)
    assert mixed.exit_code == 0 and twice.exit_code == 0, mixed.output + twice.output
    assert np.array_equal(np.load(tmp_path / "d.npy"), np.load(tmp_path / "e.npy"))


def test_a_recording_is_encoded_once_then_its_codes_come_from_the_cache(tiny_checkpoint, tiny_codec, tmp_path,
                                                                        monkeypatch):
    """A second run with the same recording and codec reads the codes the first kept (the encoder is not even
    loaded) and speaks exactly as the first did; a changed recording or another codec file is encoded again."""
    import soundfile

    from runtime import cli
    from runtime.codec import CodecConfig
    from runtime.synthetic_codec import write_synthetic_codec

    opened = []
    real_open = cli.open_codec
    monkeypatch.setattr(cli, "open_codec", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    codec, config = tiny_codec
    cache = tmp_path / "cache"
    text = ("--reference-text", "A reading.", "--codec-config", config, "--cache-dir", cache)

    def speak(out, recording, codec_file=codec):
        result = synth(tiny_checkpoint, tmp_path / out, "-r", recording, "--codec", codec_file, *text)
        assert result.exit_code == 0, result.output
        return result.stderr, np.load(tmp_path / out)

    first, first_codes = speak("a.npy", RECORDING)
    again, again_codes = speak("b.npy", RECORDING)
    assert "kept in the cache" in first and "from the cache" in again and "encoded tests" not in again
    assert opened == [codec] and np.array_equal(first_codes, again_codes)
    assert len(list((cache / "encoded-references").glob("*.npy"))) == 1

    samples, rate = soundfile.read(RECORDING, dtype="float32")
    soundfile.write(tmp_path / "quieter.wav", samples * 0.5, rate)
    quieter, _ = speak("c.npy", tmp_path / "quieter.wav")
    other = write_synthetic_codec(tmp_path / "other.pth", CodecConfig.load(config), seed=7)
    by_other, _ = speak("d.npy", RECORDING, other)
    assert "kept in the cache" in quieter and "kept in the cache" in by_other
    assert opened == [codec, codec, other]
    assert len(list((cache / "encoded-references").glob("*.npy"))) == 3
    assert "3 encoded recordings" in run("cache", "list", "--cache-dir", cache).output
    (tmp_path / "file").write_text("")
    unwritable = synth(tiny_checkpoint, tmp_path / "e.npy", "-r", RECORDING, "--codec", codec, *text[:4],
                       "--cache-dir", tmp_path / "file" / "cache")
    assert unwritable.exit_code == 0 and "warning: could not keep the encoded reference" in unwritable.stderr


def test_bad_references_fail_before_the_model_loads(tiny_checkpoint, tiny_codec, tmp_path, monkeypatch):
    from runtime import cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    codec, config = tiny_codec
    with_codec = ("--codec", codec, "--codec-config", config)
    (tmp_path / "noise.wav").write_bytes(b"RIFF not really a wav file")
    cases = [
        (("-r", tmp_path / "absent.wav", "--reference-text", "t"), 4, "absent.wav"),
        (("-r", tmp_path / "noise.wav", "--reference-text", "t"), 4, "noise.wav"),
        (("-r", RECORDING), 2, "1 --reference but 0 --reference-text"),
        (("-r", RECORDING, "--reference-text", " "), 2, "its --reference-text is empty"),
    ]
    for args, code, message in cases:
        result = synth(tiny_checkpoint, tmp_path / "o.npy", *args, *with_codec)
        assert result.exit_code == code and message in result.stderr, (args, result.output)
        assert "Traceback" not in result.output
    import dataclasses

    from runtime.codec import CodecConfig
    from runtime.synthetic_codec import write_synthetic_codec

    larger = dataclasses.replace(CodecConfig.load("tiny"), semantic_codebook_size=4096, codebook_size=1024)
    (tmp_path / "larger.json").write_text(json.dumps(dataclasses.asdict(larger)))
    write_synthetic_codec(tmp_path / "larger.pth", larger)  # books larger than the model's
    foreign = synth(tiny_checkpoint, tmp_path / "o.npy", "-r", RECORDING, "--reference-text", "t",
                    "--codec", tmp_path / "larger.pth", "--codec-config", tmp_path / "larger.json")
    assert foreign.exit_code == 2 and "(encoded): values must lie in [0, 63]" in foreign.stderr, foreign.output
    assert not (tmp_path / "o.npy").exists()


def test_synthesize_writes_audio_with_the_codec(tiny_checkpoint, tmp_path):
    """--codec-config auto (the default) finds the tiny codec from the file's shapes."""
    import soundfile

    from runtime.codec import CodecConfig
    from runtime.synthetic_codec import write_synthetic_codec

    write_synthetic_codec(tmp_path / "codec.pth", CodecConfig.load("tiny"))
    result = synth(tiny_checkpoint, tmp_path / "c.npy", "-o", tmp_path / "out.wav", "--codec", tmp_path / "codec.pth")
    assert result.exit_code == 0, result.output
    audio, rate = soundfile.read(tmp_path / "out.wav")
    frames = np.load(tmp_path / "c.npy").shape[1]
    assert rate == 44100 and audio.shape == (frames * 2048,) and np.abs(audio).max() > 0


def test_codes_go_beside_the_audio_by_default(tiny_checkpoint, tiny_codec, tmp_path, monkeypatch):
    """Without --codes-out the codes take -o's name with .npy (one per take, as the audio), and output.npy in the
    working folder when there is no audio file."""
    codec, _ = tiny_codec
    monkeypatch.chdir(tmp_path)
    common = ("synthesize", "-c", tiny_checkpoint, "-t", "hello there", "--top-k", "1", "--precision", "fp32",
              "--device", "cpu", "--max-new-tokens", "8", "--codec", codec)
    with_audio = run(*common, "-o", tmp_path / "takes" / "hello.wav")
    assert with_audio.exit_code == 0, with_audio.output
    assert sorted(p.name for p in (tmp_path / "takes").iterdir()) == ["hello.npy", "hello.wav"]
    assert not (tmp_path / "output.npy").exists()
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\n")
    each = run(*common[:3], "--text-file", lines, "--each-line", *common[5:], "-o", tmp_path / "takes" / "t.flac")
    assert each.exit_code == 0, each.output
    written = {p.name for p in (tmp_path / "takes").iterdir()}
    assert {"t-0001.npy", "t-0001.flac", "t-0002.npy", "t-0002.flac"} <= written
    codes_only = run(*common)
    assert codes_only.exit_code == 0, codes_only.output
    assert np.load(tmp_path / "output.npy").shape[0] == 10


def test_synthesize_streams_wav_to_stdout_while_generating(tiny_checkpoint, tmp_path, monkeypatch):
    """-o -: a WAV stream on standard output, written frame by frame as the codes come (eagerly on the CPU), whose
    samples are those of the codes decoded afterwards (to 1 LSB: the codec's chunking moves float rounding); the
    messages go to standard error."""
    import soundfile

    from runtime import audio
    from runtime.codec import CodecConfig
    from runtime.synthetic_codec import write_synthetic_codec

    writes = []
    real_write = audio.WavPipe.write
    monkeypatch.setattr(audio.WavPipe, "write", lambda pipe, samples: (writes.append(len(samples)),
                                                                        real_write(pipe, samples)))
    codec = write_synthetic_codec(tmp_path / "codec.pth", CodecConfig.load("tiny"))
    streamed = synth(tiny_checkpoint, tmp_path / "c.npy", "-o", "-", "--codec", codec)
    assert streamed.exit_code == 0, streamed.output
    data = streamed.stdout_bytes
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt " and data[36:40] == b"data"
    frames = np.load(tmp_path / "c.npy").shape[1]
    assert writes == [2048] * frames  # one piece per frame, as each was generated
    samples = np.frombuffer(data[44:], "<i2")
    decoded = run("decode", tmp_path / "c.npy", "-o", tmp_path / "d.wav", "--codec", codec)
    assert decoded.exit_code == 0, decoded.output
    reference, _ = soundfile.read(tmp_path / "d.wav", dtype="int16")
    assert samples.shape == reference.shape == (frames * 2048,) and np.abs(reference).max() > 100
    assert np.abs(samples.astype(np.int32) - reference).max() <= 1
    assert "wrote" in streamed.stderr and b"wrote" not in data


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_recording_is_encoded_on_the_gpu_and_its_codec_freed_before_the_plan(tiny_checkpoint, tiny_codec,
                                                                              tmp_path, monkeypatch):
    """The encoder runs on the GPU and is gone when the plan measures the free memory: the codec object is freed.
    (What the allocator keeps cached then is not checked: with expandable segments, pages shared with live tensors
    such as the cuBLAS workspace stay, 0-9 MiB across runs.)"""
    import weakref

    from runtime import cli

    codecs, seen = [], []
    real_open, real_detect = cli.open_codec, cli.detect_device

    def open_codec(*args, **kwargs):
        codec = real_open(*args, **kwargs)
        codecs.append(weakref.ref(codec))
        return codec

    def detect_device(*args):
        seen.append([ref() is None for ref in codecs])
        return real_detect(*args)

    monkeypatch.setattr(cli, "open_codec", open_codec)
    monkeypatch.setattr(cli, "detect_device", detect_device)
    codec, config = tiny_codec
    result = run("synthesize", "-c", tiny_checkpoint, "-t", "hello there", "--seed", "0", "--device", "cuda",
                 "--precision", "bf16", "--max-new-tokens", "10", "--codes-out", tmp_path / "c.npy",
                 "-r", RECORDING, "--reference-text", "A reading.", "--codec", codec, "--codec-config", config)
    assert result.exit_code == 0, result.output
    assert "encoded" in result.stderr and "on cuda" in result.stdout
    assert seen == [[True]]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_streaming_from_the_graph_loop_on_a_gpu(tiny_checkpoint, tmp_path, monkeypatch):
    """On a GPU the codes come from the CUDA-graph loop at its host checks and the codec decodes the pieces on the GPU
    beside the replays (the first at once): the stream is still the codes' audio."""
    import soundfile

    from runtime import audio
    from runtime.codec import CodecConfig
    from runtime.synthetic_codec import write_synthetic_codec

    writes = []
    real_write = audio.WavPipe.write
    monkeypatch.setattr(audio.WavPipe, "write", lambda pipe, samples: (writes.append(len(samples)),
                                                                        real_write(pipe, samples)))
    codec = write_synthetic_codec(tmp_path / "codec.pth", CodecConfig.load("tiny"))
    args = ["-c", tiny_checkpoint, "-t", "hello there", "--seed", "0", "--device", "cuda", "--precision", "bf16",
            "--max-new-tokens", "40", "--codec", codec]
    streamed = run("synthesize", *args, "--codes-out", tmp_path / "c.npy", "-o", "-")
    assert streamed.exit_code == 0, streamed.output
    frames = np.load(tmp_path / "c.npy").shape[1]
    sizes = [w // 2048 for w in writes]  # frames per piece: the host checks after frames 1, 2, 4, 8, 16, then every 16
    assert sizes[:-1] == ([1, 1, 2, 4, 8] + [16] * frames)[:len(sizes) - 1] and sum(sizes) == frames
    decoded = run("decode", tmp_path / "c.npy", "-o", tmp_path / "d.wav", "--codec", codec, "--device", "cuda")
    assert decoded.exit_code == 0, decoded.output
    reference, _ = soundfile.read(tmp_path / "d.wav", dtype="int16")
    samples = np.frombuffer(streamed.stdout_bytes[44:], "<i2")
    assert samples.shape == reference.shape and np.abs(samples.astype(np.int32) - reference).max() <= 1


def test_a_player_closing_the_stream_is_one_line(tiny_checkpoint, tmp_path, monkeypatch):
    import errno

    from runtime import audio
    from runtime.codec import CodecConfig
    from runtime.synthetic_codec import write_synthetic_codec

    def closed(pipe, samples):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(audio.WavPipe, "write", closed)
    codec = write_synthetic_codec(tmp_path / "codec.pth", CodecConfig.load("tiny"))
    result = synth(tiny_checkpoint, tmp_path / "c.npy", "-o", "-", "--codec", codec)
    assert result.exit_code == 1 and result.stderr.splitlines()[-1] == "error: Broken pipe", result.output


def test_synthesize_checks_the_codec_before_generating(tiny_checkpoint, tmp_path, monkeypatch):
    """A missing codec.pth, or a codec of another architecture than --codec-config names, is a one-line error
    before loading or generating anything: no codes are written."""
    from runtime import cli
    from runtime.codec import CodecConfig
    from runtime.synthetic_codec import write_synthetic_codec

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    missing = synth(tiny_checkpoint, tmp_path / "a.npy", "-o", tmp_path / "a.wav")  # the folder has no codec.pth
    assert missing.exit_code != 0 and "codec checkpoint not found" in missing.stderr
    write_synthetic_codec(tmp_path / "codec.pth", CodecConfig.load("tiny"))
    wrong = synth(tiny_checkpoint, tmp_path / "b.npy", "-o", tmp_path / "b.wav", "--codec", tmp_path / "codec.pth",
                  "--codec-config", "s2pro")
    assert wrong.exit_code != 0 and "expected [" in wrong.stderr and "Traceback" not in wrong.output
    assert not (tmp_path / "a.npy").exists() and not (tmp_path / "b.npy").exists()


@pytest.mark.parametrize("where, message", [
    ("audio_suffix", "use a .wav, .flac, .mp3 or .ogg file name"),
    ("codes_suffix", "cannot write same.wav: use a .npy file name"),
    ("codes_folder", "it is a folder"),
    ("below_a_file", "is not a folder"),
])
def test_synthesize_checks_its_outputs_before_loading(where, message, tiny_checkpoint, tmp_path, monkeypatch):
    """Outputs written after the generation are checked first: a refused one costs no loading or generating."""
    from runtime import cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "file").write_bytes(b"x")
    codes, extra = tmp_path / "c.npy", []
    if where == "audio_suffix":
        extra = ["-o", tmp_path / "out.m4a"]
    elif where == "codes_suffix":  # codes and audio to one file: one would overwrite the other
        codes, extra = tmp_path / "same.wav", ["-o", tmp_path / "same.wav"]
    elif where == "codes_folder":
        codes = tmp_path / "folder.npy"
        codes.mkdir()
    else:
        codes = tmp_path / "file" / "c.npy"
    result = synth(tiny_checkpoint, codes, *extra)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] + (["folder.npy"] if where == "codes_folder" else [])


def test_decode_and_encode_check_the_output_first(tmp_path):
    codes = bad_codes(tmp_path, "c.npy", np.zeros((10, 4), np.int64))
    decoded = run("decode", codes, "-o", tmp_path / "out.aac", "--codec", tmp_path / "absent.pth")
    assert decoded.exit_code == 2 and "use a .wav, .flac, .mp3 or .ogg file name" in decoded.stderr
    (tmp_path / "file").write_bytes(b"x")
    encoded = run("encode", tmp_path / "absent.wav", "-o", tmp_path / "file" / "r.npy")
    assert encoded.exit_code == 2 and "is not a folder" in encoded.stderr
    not_npy = run("encode", tmp_path / "absent.wav", "-o", tmp_path / "r.wav")
    assert not_npy.exit_code == 2 and "cannot write r.wav: use a .npy file name" in not_npy.stderr
    no_codec = run("encode", RECORDING, "-o", tmp_path / "r.npy", "--codec", tmp_path / "absent.pth")
    assert no_codec.exit_code != 0 and "absent.pth" in no_codec.stderr
    assert "warning" not in no_codec.stderr  # the codec is checked before the recording is read


def test_audio_given_as_codes_points_to_encode(tmp_path):
    from runtime.audio import write_audio

    wav = write_audio(tmp_path / "ref.wav", np.zeros(4410, np.float32))
    result = run("decode", wav, "-o", tmp_path / "out.wav")
    assert result.exit_code == 2 and "s2edge encode" in result.stderr, result.output


def test_inspect_reports_counts(tiny_checkpoint, tiny_config):
    result = run("inspect", tiny_checkpoint)
    assert result.exit_code == 0, result.output
    assert f"parameters   {tiny_config.parameter_count():,}" in result.stdout
    assert "model-00002-of-00002.safetensors" in result.stdout


def test_synthetic_command_writes_a_loadable_checkpoint(tmp_path):
    """The folder `synthetic` writes serves the README's main job as it is: weights, tokenizer and codec.pth."""
    result = run("synthetic", tmp_path / "ck", "--config", "tiny", "--shards", "1")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ck" / "model.safetensors").exists() and (tmp_path / "ck" / "codec.pth").exists()
    assert run("inspect", tmp_path / "ck").exit_code == 0
    spoken = synth(tmp_path / "ck", tmp_path / "c.npy", "-o", tmp_path / "c.wav", "-r", RECORDING,
                   "--reference-text", "A reading.")  # its codec's codes fit the model's books
    assert spoken.exit_code == 0, spoken.output
    assert "encoded tests/fixtures" in spoken.stderr
    assert (tmp_path / "c.wav").stat().st_size > 44
    assert run("synthetic", tmp_path / "bare", "--no-codec").exit_code == 0
    assert not (tmp_path / "bare" / "codec.pth").exists()


def bad_codes(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return path


@pytest.fixture()
def broken(tmp_path, tiny_checkpoint):
    """Copies of the tiny checkpoint damaged in one way each."""
    def make(kind: str):
        ckpt = shutil.copytree(tiny_checkpoint, tmp_path / kind)
        shard = ckpt / "model-00002-of-00002.safetensors"
        if kind == "missing_shard":
            shard.unlink()
        elif kind == "truncated":
            shard.write_bytes(shard.read_bytes()[:-10])
        elif kind == "config":
            raw = json.loads((ckpt / "config.json").read_text())
            del raw["text_config"]["dim"]
            (ckpt / "config.json").write_text(json.dumps(raw))
        return ckpt
    return make


@pytest.mark.parametrize(
    "case, code, message",
    [
        ("missing_folder", 3, "checkpoint folder not found"),
        ("missing_shard", 3, "shard model-00002-of-00002.safetensors"),
        ("truncated", 3, "truncated shard"),
        ("config", 3, "'dim' is missing"),
        ("empty_text", 2, "the text to speak is empty"),
        ("codes_shape", 2, r"shape \[9, 4\]"),
        ("codes_dtype", 2, "not an integer type"),
        ("codes_range", 2, "values must lie in"),
        ("codes_missing", 2, "codes file not found"),
        ("codes_unpaired", 2, "one transcript per reference"),
        ("bad_temperature", 2, "temperature must be in"),
        ("text_file_missing", 2, "lines.txt: cannot read text \\(No such file or directory\\)"),
        ("text_file_latin1", 2, "lines.txt: not UTF-8 text"),
    ],
)
def test_bad_inputs_give_one_line(case, code, message, tiny_checkpoint, tmp_path, broken):
    ckpt, text, extra = tiny_checkpoint, "hello", []
    if case == "missing_folder":
        ckpt = tmp_path / "nope"
    elif case in ("missing_shard", "truncated", "config"):
        ckpt = broken(case)
    elif case == "empty_text":
        text = "   "
    elif case.startswith("codes_"):
        arrays = {"codes_shape": np.zeros((9, 4), np.int64), "codes_dtype": np.zeros((10, 4), np.float32),
                  "codes_range": np.full((10, 4), 64, np.int64)}
        path = bad_codes(tmp_path, "r.npy", arrays.get(case, np.zeros((10, 4), np.int64)))
        if case == "codes_missing":
            path = tmp_path / "absent.npy"
        extra = ["-r", path] + ([] if case == "codes_unpaired" else ["--reference-text", "ref"])
    elif case == "bad_temperature":
        extra = ["--temperature", "0"]
    text_args = ["-t", text]
    if case.startswith("text_file"):
        if case == "text_file_latin1":
            (tmp_path / "lines.txt").write_bytes("Caf\u00e9 cr\u00e8me".encode("latin-1"))
        text_args = ["--text-file", tmp_path / "lines.txt"]
    result = run("synthesize", "-c", ckpt, *text_args, "--device", "cpu", "--codes-out", tmp_path / "o.npy", *extra)
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "o.npy").exists()  # nothing half-written


def test_the_program_ends_with_its_exit_code_and_every_byte_written(tiny_checkpoint, tiny_codec, tmp_path):
    """`s2edge` as a process (runtime.cli:run ends it without the interpreter's teardown): the exit code is the
    command's, and what it wrote to standard output and error arrives whole (here a WAV stream on a pipe)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "runtime.cli", "synthesize", "-c", str(tiny_checkpoint), "--device", "cpu",
               "--precision", "fp32", "--top-k", "1", "--max-new-tokens", "8", "--codes-out", str(tmp_path / "c.npy"),
               "--codec", str(tiny_codec[0])]
    streamed = subprocess.run([*command, "-t", "hello there", "-o", "-"], capture_output=True, timeout=300)
    assert streamed.returncode == 0, streamed.stderr.decode()
    frames = np.load(tmp_path / "c.npy").shape[1]
    assert len(streamed.stdout) == 44 + frames * 2048 * 2 and streamed.stdout[:4] == b"RIFF"
    assert streamed.stderr.decode().rstrip().endswith("frames/s on cpu")
    refused = subprocess.run([*command, "-t", " "], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr == "error: the text to speak is empty\n"
    # a profiler writes its results at the interpreter's exit: with one attached, the program exits normally
    profiled = [sys.executable, "-m", "cProfile", "-o", str(tmp_path / "run.prof"), *command[1:]]
    under_profiler = subprocess.run([*profiled, "-t", " "], capture_output=True, text=True, timeout=300)
    assert "the text to speak is empty" in under_profiler.stderr and (tmp_path / "run.prof").stat().st_size > 0


def test_every_command_runs_without_cudnn_attention(tmp_path):
    """cuDNN builds an attention plan per new sequence length (45-70 ms each on an H100): the commands leave it
    out of torch's attention backends (runtime/devices.py skip_cudnn_attention)."""
    before = torch.backends.cuda.cudnn_sdp_enabled()  # an earlier command in this process may have left it off
    torch.backends.cuda.enable_cudnn_sdp(True)  # torch's default
    try:
        assert run("plan", "--gpu", "RTX 4070").exit_code == 0
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
