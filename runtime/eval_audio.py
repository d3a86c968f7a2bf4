"""`s2edge eval --audio`: each mode speaks the bf16 takes' texts with their seeds, the codec decodes every take,
and the judges (runtime/audio_judges.py) hear them: word errors against the text, similarity to the reference voice
and a predicted opinion score, each compared with bf16's take of the same text and seed (runtime/paired.py).

Free-running takes diverge from bf16's after a few frames, so no frame-by-frame comparison is possible; what a
listener would notice is the words, the voice and the sound, and the protocol's tier 3 gates those
(spec/quality-protocol.md): FP8 and INT8 at most +0.5 WER points, at least -0.01 similarity and -0.05 MOS; NF4
+1.0, -0.02 and -0.10. The takes' length against bf16's and how many ran out of frames before <|im_end|> are
reported, not gated.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import click
import numpy as np
import torch

from runtime.audio_judges import QualityPredictor, SpeakerEncoder, Transcriber, similarity, to_judge_rate, word_errors
from runtime.codec import Codec
from runtime.paired import Estimate, mean_change, wer_change


@dataclass(frozen=True)
class Take:
    text: str
    codes: torch.Tensor  # [num_codebooks, n] on the CPU
    stopped: bool  # ended with <|im_end|> (else the frame budget ran out)


@dataclass(frozen=True)
class Heard:
    errors: int  # word errors of the transcript against the text
    words: int  # words in the text
    similarity: float | None  # to the reference voice (None: no single reference voice)
    mos: float  # predicted overall opinion score, 1 to 5 (1 for a take without frames)
    frames: int
    stopped: bool


@dataclass(frozen=True)
class AudioGate:
    max_wer_increase: float  # percentage points over bf16's word error rate
    min_similarity_change: float  # speaker similarity minus bf16's, at least
    min_mos_change: float  # predicted opinion score minus bf16's, at least


def decode(codec: Codec, codes: torch.Tensor) -> np.ndarray:
    """Codes [num_codebooks, n] -> 16 kHz mono float32 (empty for a take without frames)."""
    if codes.shape[1] == 0:
        return np.zeros(0, dtype=np.float32)
    return to_judge_rate(codec.decode(codes).cpu().numpy(), codec.config.sample_rate)


def listen(takes: dict[str, list[Take]], codec: Codec, voice_codes: torch.Tensor | None) -> dict[str, list[Heard]]:
    """Decode and hear every take of every mode; similarity only with a single reference voice (`voice_codes`, decoded
    by the same codec, so both sides carry its coloring)."""
    transcribe, embed, score = Transcriber(), SpeakerEncoder(), QualityPredictor()
    voice = embed(decode(codec, voice_codes)) if voice_codes is not None else None
    heard: dict[str, list[Heard]] = {}
    total = sum(len(t) for t in takes.values())
    with click.progressbar(length=total, label="listening to the takes", file=sys.stderr) as bar:
        for mode, mode_takes in takes.items():
            heard[mode] = []
            for take in mode_takes:
                audio = decode(codec, take.codes)
                errors, words = word_errors(take.text, transcribe(audio) if audio.size else "")
                similar = None if voice is None else (similarity(embed(audio), voice) if audio.size else 0.0)
                mos = score(audio) if audio.size else 1.0
                heard[mode].append(Heard(errors, words, similar, mos, take.codes.shape[1], take.stopped))
                bar.update(1)
    return heard


def _column(heard: list[Heard], field: str) -> np.ndarray:
    return np.array([getattr(h, field) for h in heard], dtype=np.float64)


def audio_table(heard: dict[str, list[Heard]], gates: dict[str, AudioGate], reference: str = "bf16"
                ) -> tuple[list[str], list[str]]:
    """The markdown table (bf16 first, then each mode with its changes and gate) and the modes that missed a gate."""
    base = heard[reference]
    words, base_errors = _column(base, "words"), _column(base, "errors")
    with_voice = base[0].similarity is not None
    rows, failed = [], []
    for mode, takes in heard.items():
        errors, frames = _column(takes, "errors"), _column(takes, "frames")
        wer = f"{100 * errors.sum() / words.sum():.1f} %"
        sim = f"{_column(takes, 'similarity').mean():.3f}" if with_voice else "-"
        mos = f"{_column(takes, 'mos').mean():.2f}"
        length = f"{frames.sum() / max(_column(base, 'frames').sum(), 1):.2f}"
        no_end = f"{sum(not h.stopped for h in takes)}/{len(takes)}"
        if mode == reference:
            rows.append(f"| {mode} | {wer} | - | {sim} | - | {mos} | - | {length} | {no_end} | - |")
            continue
        gate = gates[mode]
        wer_delta = wer_change(errors, base_errors, words)
        mos_delta = mean_change(_column(takes, "mos"), _column(base, "mos"))
        sim_delta: Estimate | None = None
        if with_voice:
            sim_delta = mean_change(_column(takes, "similarity"), _column(base, "similarity"))
        passed = (wer_delta.value <= gate.max_wer_increase and mos_delta.value >= gate.min_mos_change
                  and (sim_delta is None or sim_delta.value >= gate.min_similarity_change))
        failed += [] if passed else [mode]
        rows.append(f"| {mode} | {wer} | {wer_delta.text(1)} | {sim} | {sim_delta.text(3) if sim_delta else '-'} | "
                    f"{mos} | {mos_delta.text(2)} | {length} | {no_end} | {'pass' if passed else 'FAIL'} |")
    pairs = len(base)
    voice_note = "" if with_voice else " (needs exactly one --voice)"
    header = [f"Heard against {reference}: {pairs} pair(s) of takes (same text and seed), word errors by Whisper "
              f"tiny.en, speaker similarity to the reference voice{voice_note}"
              ", opinion score predicted by DNSMOS (overall, 1-5); changes with 95 % bootstrap intervals over the "
              "pairs.", "",
              "| mode | WER | WER change, points | speaker similarity | similarity change | MOS | MOS change | "
              "length vs bf16 | no <\\|im_end\\|> | gate |", "|---|---|---|---|---|---|---|---|---|---|"]
    return header + rows, failed
