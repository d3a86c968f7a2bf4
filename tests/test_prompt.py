"""Prompt matrices for 0, 1 and 2 references, checked token by token against spec section 5.

The tiny tokenizer is byte-level with id = byte value, plus four merges ("he" 256, " t" 257, " the" 258,
"\\n\\n" 259) and specials at <|im_start|> 301, <|im_end|> 302, <|voice|> 330, <|semantic:c|> 335 + c.
"""

from __future__ import annotations

import pytest
import torch

from runtime.errors import InputError
from runtime.prompt import Reference, build_prompt, check_codes, speaker_turns, text_batches

IM_START, IM_END, VOICE, SEM0 = 301, 302, 330, 335


def b(text: str) -> list[int]:
    """Bytes of a piece that no merge touches."""
    return list(text.encode())


NL2 = 259
# "convert the provided text to speech" -> pieces: convert | " the" | " provided" | " text" | " to" | " speech"
SYSTEM_PLAIN = b("convert") + [258] + b(" provided") + [257] + b("ext") + [257] + b("o") + b(" speech")
# ... " reference" " to" " the" " following" ":\n\n" "Text" ":\n"
SYSTEM_CLONE = SYSTEM_PLAIN + b(" reference") + [257] + b("o") + [258] + b(" following") + [58, NL2] + b("Text:\n")
SPEECH = [NL2] + b("Speech:\n")


def header(role: str) -> list[int]:
    return [IM_START] + b(role) + [10]


def tail(text_ids: list[int]) -> list[int]:
    """user message with the target text, then the assistant header that generation continues."""
    return header("user") + text_ids + [IM_END, 10] + header("assistant") + [VOICE]


def codes(t: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (10, t), generator=torch.Generator().manual_seed(seed))


def check_code_columns(prompt: torch.Tensor, start: int, expected: torch.Tensor) -> None:
    t = expected.shape[1]
    assert prompt[0, start : start + t].tolist() == (expected[0] + SEM0).tolist()
    assert torch.equal(prompt[1:, start : start + t], expected)


def test_no_reference(tiny_model):
    prompt = build_prompt(tiny_model.tokenizer, "hi", [], 10)
    expected = header("system") + SYSTEM_PLAIN + [IM_END, 10] + tail(b("hi"))
    assert prompt.shape == (11, len(expected)) and prompt.dtype == torch.int64
    assert prompt[0].tolist() == expected
    assert not prompt[1:].any()


def test_one_reference(tiny_model):
    ref = Reference(codes(4, 0), "ok")
    prompt = build_prompt(tiny_model.tokenizer, "hi", [ref], 10)
    before = header("system") + SYSTEM_CLONE + b("<|speaker:0|>ok") + SPEECH
    after = [IM_END, 10] + tail(b("hi"))
    assert prompt[0].tolist() == before + (ref.codes[0] + SEM0).tolist() + after
    check_code_columns(prompt, len(before), ref.codes)
    assert not prompt[1:, : len(before)].any() and not prompt[1:, len(before) + 4 :].any()


def test_two_references_tagged_by_index_and_codes_concatenated(tiny_model):
    refs = [Reference(codes(3, 1), "ok"), Reference(codes(2, 2), "<|speaker:7|>yo")]  # an existing tag is kept
    prompt = build_prompt(tiny_model.tokenizer, "hi", refs, 10)
    before = header("system") + SYSTEM_CLONE + b("<|speaker:0|>ok\n<|speaker:7|>yo") + SPEECH
    both = torch.cat([refs[0].codes, refs[1].codes], dim=1)
    assert prompt[0].tolist() == before + (both[0] + SEM0).tolist() + [IM_END, 10] + tail(b("hi"))
    check_code_columns(prompt, len(before), both)


def test_parts_are_tokenized_separately(tiny_model):
    # "ok\n" followed by "\n\nSpeech:\n" would merge into "\n\n\n" if tokenized as one string.
    prompt = build_prompt(tiny_model.tokenizer, "hi", [Reference(codes(1, 3), "ok\n")], 10)
    expected_start = header("system") + SYSTEM_CLONE + b("<|speaker:0|>ok\n") + SPEECH
    assert prompt[0, : len(expected_start)].tolist() == expected_start
    whole = tiny_model.tokenizer.encode("ok\n\n\nSpeech:\n")
    assert whole[:3] != b("ok\n")  # the negative control: joint tokenization differs


def test_history_replays_user_and_assistant_turns(tiny_model):
    past = codes(2, 4)
    prompt = build_prompt(tiny_model.tokenizer, "hi", [], 10, history=[("yo", past)])
    expected = (header("system") + SYSTEM_PLAIN + [IM_END, 10] + header("user") + b("yo") + [IM_END, 10]
                + header("assistant") + [VOICE] + (past[0] + SEM0).tolist() + [IM_END, 10] + tail(b("hi")))
    assert prompt[0].tolist() == expected


def test_empty_text_is_refused(tiny_model):
    with pytest.raises(InputError, match="empty"):
        build_prompt(tiny_model.tokenizer, " \n", [], 10)


@pytest.mark.parametrize(
    "bad, message",
    [(torch.zeros(9, 4, dtype=torch.int64), r"shape \[9, 4\]"), (torch.zeros(10, 0, dtype=torch.int64), "T > 0"),
     (torch.zeros(10, 4), "not an integer"), (torch.full((10, 4), 64), r"\[0, 63\], found 64..64"),
     (torch.full((10, 4), -1), "found -1"), ([[1, 2]], "expected an integer array")],
)
def test_bad_reference_codes(bad, message):
    with pytest.raises(InputError, match=message):
        check_codes(bad, 10, 64)


def test_speaker_turns_keep_every_word():
    text = "Before any tag. <|speaker:0|> Hi there. <|speaker:1|>Hello!  <|speaker:0|>   "
    assert speaker_turns(text) == ["Before any tag.", "<|speaker:0|>Hi there.", "<|speaker:1|>Hello!"]
    assert speaker_turns("no tags at all") == ["no tags at all"]


def test_text_batches_group_turns_greedily_by_bytes_and_speakers():
    tagged = "".join(f"<|speaker:{k % 2}|>Line {k}." for k in range(7))
    assert text_batches(tagged, 1000) == [  # at most 5 turns per batch, joined by newlines
        "\n".join(f"<|speaker:{k % 2}|>Line {k}." for k in range(5)),
        "<|speaker:1|>Line 5.\n<|speaker:0|>Line 6.",
    ]
    batches = text_batches(tagged, 40)
    assert all(len(b.encode()) <= 40 for b in batches) and "\n".join(batches) == "\n".join(speaker_turns(tagged))
    assert text_batches(tagged, 10) == speaker_turns(tagged)  # one turn each: a turn is never merged past the limit


def test_long_untagged_text_is_cut_at_sentence_ends():
    text = "One sentence here. Another one follows! A question? " + "Word " * 12 + "is long. End."
    batches = text_batches(text, 30)
    assert " ".join(batches).split() == text.split()  # nothing lost, nothing added
    long_sentence = "Word " * 12 + "is long."
    assert batches == ["One sentence here.", "Another one follows!", "A question?", long_sentence.strip(), "End."]
    assert text_batches("<|speaker:3|>Un. Deux. Trois.", 22) == ["<|speaker:3|>Un. Deux.", "<|speaker:3|>Trois."]
    assert len("é".encode()) == 2 and text_batches("éé. éé.", 5) == ["éé.", "éé."]  # UTF-8 bytes, not characters
    with pytest.raises(InputError, match="empty"):
        text_batches("  ", 100)


def test_style_tags_are_never_cut():
    """A bracketed style tag may hold sentence ends ("[sighs. a long pause]"): cuts fall only outside tags, and a tag
    stays with the sentence that follows it."""
    text = "[sighs. a long pause] Fine. I will go. [whispering] Come here! Now."
    assert text_batches(text, 12) == ["[sighs. a long pause] Fine.", "I will go.", "[whispering] Come here!", "Now."]
    untagged = text.replace("[", "").replace("]", "")  # negative control: without brackets the same text is cut there
    assert text_batches(untagged, 12)[:2] == ["sighs.", "a long pause Fine."]
