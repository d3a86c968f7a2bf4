"""tokenizer.json: special ids read from the file; the synthetic file matches the released ids."""

from __future__ import annotations

import pytest

from runtime.config import bundled_config
from runtime.errors import CheckpointError
from runtime.synthetic_tokenizer import build_tokenizer, write_tokenizer
from runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def full_tokenizer(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    write_tokenizer(path, bundled_config("s2-pro"))
    return Tokenizer(path)


def test_full_size_special_ids_match_release(full_tokenizer):
    ids = full_tokenizer.ids
    assert (ids.im_start, ids.im_end, ids.voice) == (151644, 151645, 151673)
    assert (ids.semantic_begin, ids.semantic_end) == (151678, 155773)
    tk = full_tokenizer._tk
    assert tk.token_to_id("<|endoftext|>") == 151643
    assert tk.token_to_id("<|pad|>") == 151669
    assert tk.token_to_id("<|audio_pad|>") == 151677
    assert len(full_tokenizer) == 155774  # embedding rows are padded to 155776


def test_encoding_is_byte_level_with_inline_specials(full_tokenizer):
    assert full_tokenizer.encode("\n") == [10]
    assert full_tokenizer.encode("<|semantic:0|><|semantic:4095|><|im_end|>") == [151678, 155773, 151645]
    # <|speaker:N|> is not a special token: it is spelt out byte by byte
    assert full_tokenizer.encode("<|speaker:1|>") == list(b"<|speaker:1|>")
    assert full_tokenizer.encode(" the") == [258]  # merges apply
    text = "Grüße, 世界! 123"
    assert full_tokenizer.decode(full_tokenizer.encode(text)) == text


def test_tiny_tokenizer_follows_tiny_config(tiny_model):
    ids = tiny_model.tokenizer.ids
    c = tiny_model.config
    assert (ids.im_end, ids.semantic_begin, ids.semantic_end) == (c.im_end_id, c.semantic_begin_id, c.semantic_end_id)


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Tokenizer(tmp_path / "tokenizer.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(CheckpointError, match="not a valid tokenizer.json"):
        Tokenizer(bad)
    no_semantic = tmp_path / "plain.json"
    tk = build_tokenizer(bundled_config("tiny"))
    vocab_only = type(tk)(tk.model)
    vocab_only.save(str(no_semantic))
    with pytest.raises(CheckpointError, match=r"<\|semantic:0\|> is missing"):
        Tokenizer(no_semantic)
