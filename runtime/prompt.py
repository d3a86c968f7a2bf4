"""Prompt construction: text + reference voices -> the [1 + num_codebooks, L] matrix the slow AR reads.

Follows the reference conversation format (spec section 5): every text part is tokenized on its own (BPE never
merges across parts), a codes part writes `<|semantic:c0|>` into row 0 and all codebooks into rows 1..10.

    <|im_start|>system\\n | convert ... following:\\n\\nText:\\n | <|speaker:0|>ref text 0\\n<|speaker:1|>... |
    \\n\\nSpeech:\\n | [codes of all references, concatenated] | <|im_end|>\\n
    <|im_start|>user\\n | text | <|im_end|>\\n
    <|im_start|>assistant\\n<|voice|>            <- generation starts here
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from runtime.errors import InputError
from runtime.tokenizer import IM_END, IM_START, VOICE, Tokenizer

SYSTEM_PLAIN = "convert the provided text to speech"
SYSTEM_CLONE = "convert the provided text to speech reference to the following:\n\nText:\n"
SPEECH_SEPARATOR = "\n\nSpeech:\n"
SPEAKER_TAG = re.compile(r"<\|speaker:\d+\|>")

Part = Union[str, torch.Tensor]  # a text part, or codes [num_codebooks, T]


@dataclass(frozen=True)
class Reference:
    """One reference voice: its codec codes [num_codebooks, T] and the transcript of that audio."""

    codes: torch.Tensor
    text: str


def check_codes(codes: object, num_codebooks: int, codebook_size: int, what: str = "reference codes") -> torch.Tensor:
    """Validate codes from a user file and return them as int64 [num_codebooks, T]."""
    if isinstance(codes, np.ndarray):
        if not np.issubdtype(codes.dtype, np.integer):
            raise InputError(f"{what}: dtype {codes.dtype} is not an integer type")
        codes = torch.from_numpy(codes.astype(np.int64))
    if not isinstance(codes, torch.Tensor):
        raise InputError(f"{what}: expected an integer array, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise InputError(f"{what}: dtype {codes.dtype} is not an integer type")
    if codes.ndim != 2 or codes.shape[0] != num_codebooks or codes.shape[1] == 0:
        raise InputError(f"{what}: shape {list(codes.shape)}, expected [{num_codebooks}, T] with T > 0")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= codebook_size:
        raise InputError(f"{what}: values must lie in [0, {codebook_size - 1}], found {lo}..{hi}")
    return codes.to(torch.int64)


def tag_reference_texts(references: list[Reference]) -> str:
    """Prefix each transcript with `<|speaker:k|>` (k = its index) unless it already carries a speaker tag."""
    return "\n".join(r.text if SPEAKER_TAG.search(r.text) else f"<|speaker:{k}|>{r.text}" for k, r in enumerate(references))


def system_parts(references: list[Reference]) -> list[Part]:
    if not references:
        return [SYSTEM_PLAIN]
    codes = torch.cat([r.codes for r in references], dim=1)
    return [SYSTEM_CLONE, tag_reference_texts(references), SPEECH_SEPARATOR, codes]


def message(role: str, parts: list[Part], voice: bool = False) -> list[Part]:
    header = f"{IM_START}{role}\n" + (VOICE if voice else "")
    return [header, *parts, f"{IM_END}\n"]


def conversation(text: str, references: list[Reference], history: list[tuple[str, torch.Tensor]] = ()) -> list[Part]:
    """The parts of one generation request. `history` holds earlier (text, generated codes) turns of a long text,
    replayed as user/assistant messages so the voice carries over between batches."""
    if not text.strip():
        raise InputError("the text to speak is empty")
    parts = message("system", system_parts(references))
    for past_text, past_codes in history:
        parts += message("user", [past_text]) + message("assistant", [past_codes], voice=True)
    parts += message("user", [text])
    parts.append(f"{IM_START}assistant\n{VOICE}")
    return parts


def encode_parts(tokenizer: Tokenizer, parts: list[Part], num_codebooks: int) -> torch.Tensor:
    """Tokenize each part on its own and stack into the prompt matrix [1 + num_codebooks, L] (int64)."""
    columns: list[torch.Tensor] = []
    for part in parts:
        if isinstance(part, str):
            ids = torch.tensor(tokenizer.encode(part), dtype=torch.int64)
            block = torch.zeros(1 + num_codebooks, ids.numel(), dtype=torch.int64)
            block[0] = ids
        else:
            block = torch.cat([part[:1] + tokenizer.ids.semantic_begin, part], dim=0).to(torch.int64)
        columns.append(block)
    return torch.cat(columns, dim=1)


SENTENCE_END = re.compile(r"(?<=[.!?;。！？；…])\s+|\n+")
# S2's inline style tags: free-form directions in square brackets ("[whispering]", "[sighs. a long pause]"),
# spoken as written; a batch is never cut inside one
STYLE_TAG = re.compile(r"\[[^\[\]]*\]")
MAX_SPEAKERS_PER_BATCH = 5


def speaker_turns(text: str) -> list[str]:
    """Split at `<|speaker:N|>` tags: each turn is a tag and the text after it, stripped.

    Text before the first tag is a turn of its own (the reference implementation silently drops it).
    """
    starts = [m.start() for m in SPEAKER_TAG.finditer(text)]
    bounds = [0, *starts, len(text)] if not starts or starts[0] > 0 else [*starts, len(text)]
    turns = []
    for a, b in zip(bounds, bounds[1:]):
        tag = SPEAKER_TAG.match(text, a)
        head = tag.group(0) if tag else ""
        body = text[a + len(head):b].strip()
        if body:
            turns.append(head + body)
    return turns


def sentence_pieces(turn: str, max_bytes: int) -> list[str]:
    """A turn longer than max_bytes (UTF-8) cut at sentence ends into pieces of at most max_bytes; a longer
    sentence stays whole. Every piece keeps the turn's speaker tag, so each batch knows who speaks."""
    if len(turn.encode()) <= max_bytes:
        return [turn]
    tag = SPEAKER_TAG.match(turn)
    prefix = tag.group(0) if tag else ""
    pieces: list[str] = []
    for sentence in _sentences(turn[len(prefix):].strip()):
        if pieces and len((pieces[-1] + " " + sentence).encode()) <= max_bytes - len(prefix.encode()):
            pieces[-1] += " " + sentence
        elif sentence:
            pieces.append(sentence)
    return [prefix + piece for piece in pieces]


def _sentences(text: str) -> list[str]:
    """`text` split at sentence ends (SENTENCE_END) outside style tags."""
    tags = [m.span() for m in STYLE_TAG.finditer(text)]
    cuts = [m.span() for m in SENTENCE_END.finditer(text) if not any(a < m.start() < b for a, b in tags)]
    bounds = [0, *(i for span in cuts for i in span), len(text)]
    return [text[a:b] for a, b in zip(bounds[::2], bounds[1::2])]


def text_batches(text: str, max_bytes: int, max_speakers: int = MAX_SPEAKERS_PER_BATCH) -> list[str]:
    """Long text -> the texts of successive generation requests (spec 5, text batching), each at most max_bytes
    of UTF-8 unless one sentence is longer, with at most max_speakers turns, turns joined by newlines.

    As the reference: turns at speaker tags, grouped greedily. Beyond it, so memory stays bounded on a small
    card: untagged or over-long turns are cut at sentence ends instead of being generated in one pass.
    """
    if not text.strip():
        raise InputError("the text to speak is empty")
    if max_bytes < 1:
        raise InputError(f"the chunk length must be at least 1 byte, got {max_bytes}")
    batches: list[list[str]] = []
    for turn in speaker_turns(text):
        for piece in sentence_pieces(turn, max_bytes):
            last = batches[-1] if batches else None
            if last and len(last) < max_speakers and len("\n".join([*last, piece]).encode()) <= max_bytes:
                last.append(piece)
            else:
                batches.append([piece])
    return ["\n".join(batch) for batch in batches]


def build_prompt(
    tokenizer: Tokenizer,
    text: str,
    references: list[Reference],
    num_codebooks: int,
    history: list[tuple[str, torch.Tensor]] = (),
) -> torch.Tensor:
    return encode_parts(tokenizer, conversation(text, references, history), num_codebooks)
