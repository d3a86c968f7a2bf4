"""`s2edge eval --audio`: the paired statistics and gates (pure numpy), the word alignment, the judges on real
speech (with the optional packages), and the command end to end on the tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from runtime import audio_judges, eval_audio, eval_cli
from runtime.audio import read_audio
from runtime.cli import main
from runtime.codec import CodecConfig
from runtime.eval_audio import AudioGate, Heard, audio_table
from runtime.paired import bootstrap, mean_change, wer_change
from runtime.synthetic_codec import write_synthetic_codec
from runtime.voices import Voice, VoiceLibrary

FIXTURES = Path(__file__).parent / "fixtures"
READER_A = FIXTURES / "librivox_sense_and_sensibility_0870.wav"
READER_A_TEXT = ("and mister john dashwood had then leisure to consider how much there might be prudently in his "
                 "power to do for them")
READER_B = FIXTURES / "librivox_sense_and_sensibility_0930.flac"  # the same reader
READER_B_TEXT = "he might even have been made amiable himself"
OTHER_SPEAKER = FIXTURES / "an4_cards_005.flac"
listening = pytest.mark.skipif(bool(audio_judges.missing()), reason="needs the audio-eval extra")


def judge_audio(path: Path) -> np.ndarray:
    clip = read_audio(path)
    return audio_judges.to_judge_rate(clip.samples, 44100)


# --------------------------------------------------------------------------------------------------------------
# Paired statistics


def test_wer_change_counts_words_over_all_pairs():
    words = np.array([10, 20, 10])
    same = wer_change(np.array([1, 2, 0]), np.array([1, 2, 0]), words)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    worse = wer_change(np.array([2, 4, 1]), np.array([1, 2, 0]), words)
    assert worse.value == pytest.approx(100 * 4 / 40)  # 4 more errors over 40 words: +10 points
    assert worse.low <= worse.value <= worse.high and worse.low > 0  # every pair is worse


def test_bootstrap_interval_covers_the_spread_and_is_reproducible():
    rng = np.random.default_rng(3)
    delta = rng.normal(0.2, 1.0, 40)
    first = mean_change(delta, np.zeros(40))
    assert first == mean_change(delta, np.zeros(40))  # seeded resampling
    assert first.value == pytest.approx(delta.mean())
    se = delta.std(ddof=1) / np.sqrt(40)
    assert first.high - first.low == pytest.approx(2 * 1.96 * se, rel=0.2)  # the normal interval's width
    constant = mean_change(np.full(5, 0.75), np.full(5, 0.8))
    assert constant.low == constant.value == constant.high == pytest.approx(-0.05)
    with pytest.raises(ValueError):
        bootstrap(lambda i: 0.0, 0)


def heard(errors, similarity=None, mos=None, frames=20, stopped=True, words=20):
    return [Heard(e, words, None if similarity is None else similarity[i], 3.0 if mos is None else mos[i], frames,
                  stopped) for i, e in enumerate(errors)]


GATES = {name: AudioGate(0.5, -0.01, -0.05) for name in ("fp8", "int8")} | {"nf4": AudioGate(1.0, -0.02, -0.10)}


def test_audio_table_gates_word_errors_voice_and_opinion_score():
    voice = [0.80, 0.82, 0.78]
    table, failed = audio_table({
        "bf16": heard([1, 2, 1], voice),
        "fp8": heard([1, 2, 1], [0.80, 0.81, 0.79], [3.0, 2.99, 2.98]),  # same words, voice and sound
        "int8": heard([2, 3, 2], voice, frames=30, stopped=False),  # one more error per take: +5 points
        "nf4": heard([1, 2, 1], [0.75, 0.77, 0.74]),  # the voice drifts by 0.047
    }, GATES)
    rows = {line.split("|")[1].strip(): line for line in table if line.startswith("| ") and "---" not in line}
    assert rows["bf16"].startswith("| bf16 | 6.7 % | - | 0.800 | - | 3.00 | - | 1.00 | 0/3 | - |")
    assert rows["fp8"].endswith("| pass |") and "| +0.0 (" in rows["fp8"] and "| -0.01 (-0.02 to +0.00) |" in \
        rows["fp8"]
    assert rows["int8"].endswith("| FAIL |") and "| +5.0 (+5.0 to +5.0) |" in rows["int8"]
    assert "| 1.50 | 3/3 |" in rows["int8"]  # longer takes that never ended: reported, not gated
    assert rows["nf4"].endswith("| FAIL |") and "| -0.047 (" in rows["nf4"]
    assert failed == ["int8", "nf4"]
    _, failed = audio_table({"bf16": heard([0, 0]), "fp8": heard([0, 0], mos=[2.9, 2.95])}, GATES)
    assert failed == ["fp8"]  # the predicted score 0.075 lower: more than FP8's 0.05
    _, failed = audio_table({"bf16": heard([0, 0]), "nf4": heard([0, 0], mos=[2.9, 2.95])}, GATES)
    assert failed == []  # within NF4's 0.10


def test_without_a_single_voice_only_words_and_sound_are_gated():
    table, failed = audio_table({"bf16": heard([0, 0]), "nf4": heard([0, 0])}, GATES)
    assert failed == [] and "needs exactly one --voice" in table[0]
    row = [line for line in table if line.startswith("| nf4")][0]
    assert row.split("|")[4].strip() == "-" and row.split("|")[5].strip() == "-"


# --------------------------------------------------------------------------------------------------------------
# Words and the judges


def test_words_are_compared_without_case_punctuation_or_hyphens():
    pytest.importorskip("jiwer")
    assert audio_judges.words("He was not an ill-disposed young man.") == "he was not an ill disposed young man".split()
    assert audio_judges.word_errors("He was not an ill-disposed young man.", "he was not an old sposed young man") \
        == (2, 8)
    assert audio_judges.word_errors("one two three", "one two three four") == (1, 3)  # an insertion
    assert audio_judges.word_errors("one two three", "") == (3, 3)  # nothing heard: every word missed
    with pytest.raises(Exception, match="no words"):
        audio_judges.word_errors(" ... ", "anything")


@listening
def test_whisper_hears_real_speech_and_not_a_wrong_text():
    transcribe = audio_judges.Transcriber()
    heard_a, heard_b = transcribe(judge_audio(READER_A)), transcribe(judge_audio(READER_B))
    errors, words = audio_judges.word_errors(READER_B_TEXT, heard_b)
    assert errors / words <= 0.15, heard_b
    errors, words = audio_judges.word_errors(READER_A_TEXT, heard_a)
    assert errors / words <= 0.15, heard_a
    errors, words = audio_judges.word_errors(READER_A_TEXT, heard_b)  # negative control: the other utterance
    assert errors / words >= 0.8
    assert transcribe(judge_audio(READER_B)) == heard_b  # deterministic


@listening
def test_speaker_encoder_tells_the_same_reader_from_another_speaker():
    embed = audio_judges.SpeakerEncoder()
    a, b, other = (embed(judge_audio(path)) for path in (READER_A, READER_B, OTHER_SPEAKER))
    assert np.linalg.norm(a) == pytest.approx(1.0, abs=1e-4)
    same, different = audio_judges.similarity(a, b), audio_judges.similarity(a, other)
    assert same >= 0.75 and different <= 0.72 and same - different >= 0.1, (same, different)


@listening
def test_opinion_score_falls_with_added_noise():
    score = audio_judges.QualityPredictor()
    clean = judge_audio(READER_B)
    noisy = clean + np.random.default_rng(0).normal(0, 0.05, clean.shape).astype(np.float32)  # -26 dBFS white noise
    clean_mos, noisy_mos = score(clean), score(noisy)
    assert 2.8 <= clean_mos <= 4.0 and noisy_mos <= clean_mos - 0.8, (clean_mos, noisy_mos)
    assert score(np.full(16000, 2.0, dtype=np.float32)) >= 1.0  # out of range: clipped, not an error


# --------------------------------------------------------------------------------------------------------------
# The command


def run(*args):
    return CliRunner().invoke(main, ["eval", *(str(a) for a in args)])


def test_audio_without_its_packages_fails_before_loading(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(audio_judges, "missing", lambda: ["faster-whisper", "resemblyzer"])
    monkeypatch.setattr(eval_cli, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    result = run("-c", tiny_checkpoint, "--device", "cpu", "--modes", "int8", "--audio")
    assert result.exit_code == 2
    assert "needs faster-whisper, resemblyzer: pip install -e \".[audio-eval]\"" in result.stderr


def test_audio_with_a_text_without_words_fails_before_loading(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(audio_judges, "missing", lambda: [])
    monkeypatch.setattr(eval_cli, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    result = run("-c", tiny_checkpoint, "--device", "cpu", "--modes", "int8", "--audio", "--text", "Hello.",
                 "--text", "?!")
    assert result.exit_code == 2 and "every text needs words" in result.stderr


def test_audio_with_a_missing_codec_fails_before_loading(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(audio_judges, "missing", lambda: [])
    monkeypatch.setattr(eval_cli, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    result = run("-c", tiny_checkpoint, "--device", "cpu", "--modes", "int8", "--audio", "--codec",
                 tmp_path / "none.pth")
    assert result.exit_code == 3 and "none.pth" in result.stderr


class FakeTranscriber:
    """Hears the first text in every take: WER 0 on takes of that text, all words wrong on the others."""

    def __call__(self, samples):
        assert samples.dtype == np.float32 and samples.ndim == 1 and samples.size > 0
        return "Hello there."


class FakeQualityPredictor:
    def __call__(self, samples):
        assert samples.dtype == np.float32 and samples.ndim == 1 and samples.size > 0
        return 3.0


class FakeSpeakerEncoder:
    """The same voice in everything: similarity 1."""

    def __call__(self, samples):
        assert samples.dtype == np.float32 and samples.ndim == 1 and samples.size > 0
        return np.array([0.6, 0.8], dtype=np.float32)


@pytest.fixture(params=["fake judges", "real judges"])
def judges(request, monkeypatch):
    if request.param == "real judges":
        if audio_judges.missing():
            pytest.skip("needs the audio-eval extra")
        return True
    pytest.importorskip("jiwer")
    monkeypatch.setattr(audio_judges, "missing", lambda: [])
    monkeypatch.setattr(eval_audio, "Transcriber", FakeTranscriber)
    monkeypatch.setattr(eval_audio, "SpeakerEncoder", FakeSpeakerEncoder)
    monkeypatch.setattr(eval_audio, "QualityPredictor", FakeQualityPredictor)
    return False


def eval_audio_run(checkpoint, tmp_path, device, modes):
    codec = tmp_path / "codec.pth"
    write_synthetic_codec(codec, CodecConfig.load("tiny"))
    voices = tmp_path / "voices"
    codes = torch.randint(0, 64, (10, 40), generator=torch.Generator().manual_seed(0))
    VoiceLibrary(voices).save(Voice("reader", codes, "Some words.", "take"))
    report = tmp_path / "report.md"
    result = run("-c", checkpoint, "--device", device, "--modes", modes, "--audio", "--codec", codec,
                 "--voice", "reader", "--voices-dir", voices, "--takes", "2", "--text", "Hello there.", "--text",
                 "A second text.", "--frames", "12", "--cache-dir", tmp_path / "cache", "--report", report)
    assert result.exit_code in (0, 1), result.output  # random weights may miss a gate; anything else is a bug
    lines = result.stdout.splitlines()
    assert "4 take(s)" in lines[0]  # two texts x two seeds
    start = next(i for i, line in enumerate(lines) if line.startswith("Heard against"))
    assert "4 pair(s)" in lines[start] and "needs exactly one --voice" not in lines[start]
    rows = [line for line in lines[start:] if line.startswith("| ") and "---" not in line][1:]
    assert report.read_text() == result.stdout
    return result, {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]] for row in rows}


def test_eval_audio_hears_every_mode_on_the_tiny_checkpoint(tiny_checkpoint, tmp_path, judges):
    result, rows = eval_audio_run(tiny_checkpoint, tmp_path, "cpu", "fp8,int8")
    assert list(rows) == ["bf16", "fp8", "int8"]
    for cells in rows.values():
        assert 0 <= float(cells[0].removesuffix(" %")) and -1 <= float(cells[2]) <= 1 and 1 <= float(cells[4]) <= 5
    if not judges:  # takes of "Hello there." heard right, of "A second text." all 3 words wrong: 6 of 10
        assert all(cells[0] == "60.0 %" for cells in rows.values())
        assert all(cells[2] == "1.000" and cells[4] == "3.00" for cells in rows.values())
        assert rows["fp8"][1] == rows["int8"][1] == "+0.0 (+0.0 to +0.0)"
        assert rows["fp8"][-1] == rows["int8"][-1] == "pass"  # (the teacher-forced table may fail random weights)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eval_audio_on_the_gpu(tiny_checkpoint, tmp_path, monkeypatch):
    """The modes speak by graph replay and the codec decodes on the GPU (judges faked: they run on the CPU)."""
    pytest.importorskip("jiwer")
    monkeypatch.setattr(audio_judges, "missing", lambda: [])
    monkeypatch.setattr(eval_audio, "Transcriber", FakeTranscriber)
    monkeypatch.setattr(eval_audio, "SpeakerEncoder", FakeSpeakerEncoder)
    monkeypatch.setattr(eval_audio, "QualityPredictor", FakeQualityPredictor)
    _, rows = eval_audio_run(tiny_checkpoint, tmp_path, "cuda", "nf4,nf4-all")
    assert list(rows) == ["bf16", "nf4", "nf4-all"] and all(cells[0] == "60.0 %" for cells in rows.values())
