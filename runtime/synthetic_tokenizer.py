"""A tokenizer.json in the layout of the released one, for synthetic checkpoints.

The real file is Qwen3's byte-level BPE (151 643 regular tokens) followed by Qwen3's 26 special tokens, `<|pad|>`,
seven fish-speech specials, `<|audio_pad|>` and the 4 096 `<|semantic:i|>` tokens. Ours keeps that order and
those ids, with a regular vocabulary of the 256 byte symbols (id = byte value), a few merges, and unreachable
filler entries up to the regular-vocabulary size the config implies. Special ids therefore match the real file
for the real config, and for a tiny config they sit at the same offsets from a smaller base.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from runtime.config import ModelConfig
from runtime.files import atomic_path
from runtime.tokenizer import semantic_token

QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
]  # fmt: skip
FISH_SPECIALS = [
    "<|pad|>", "<|phoneme_start|>", "<|phoneme_end|>", "<|text|>", "<|voice|>", "<|interleave|>",
    "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
]  # fmt: skip
# Qwen2/3 pre-tokenizer split (contractions, letters, single digits, punctuation runs, newlines, spaces).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MERGES = [("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("Ċ", "Ċ")]  # "he", " t", " the", "\n\n"
SPECIALS_BEFORE_SEMANTIC = len(QWEN_SPECIALS) + len(FISH_SPECIALS)  # 35: <|semantic:0|> = base + 35
IM_END_OFFSET = QWEN_SPECIALS.index("<|im_end|>")


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte value, indexed by the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def regular_vocab_size(config: ModelConfig) -> int:
    """Regular tokens before the first special, implied by where the config puts <|semantic:0|>."""
    base = config.semantic_begin_id - SPECIALS_BEFORE_SEMANTIC
    if base < 256 + len(MERGES) or config.im_end_id != base + IM_END_OFFSET:
        raise ValueError(
            f"config ids (im_end {config.im_end_id}, semantic from {config.semantic_begin_id}) do not follow the "
            "released special-token layout"
        )
    return base


def build_tokenizer(config: ModelConfig) -> HFTokenizer:
    base = regular_vocab_size(config)
    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    for i in range(len(vocab), base):
        vocab[f"[filler{i}]"] = i  # never produced: no merge leads to it
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=MERGES, fuse_unk=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    specials = QWEN_SPECIALS + FISH_SPECIALS + [semantic_token(i) for i in range(config.num_semantic)]
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tk


def write_tokenizer(path: Path, config: ModelConfig) -> None:
    tk = build_tokenizer(config)
    with atomic_path(path) as tmp:
        tk.save(str(tmp))
