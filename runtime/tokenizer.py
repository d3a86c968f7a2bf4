"""The S2 Pro tokenizer: `tokenizer.json` through the `tokenizers` library, special ids read from the file.

Nothing here hard-codes an id: the real file puts `<|im_end|>` at 151645 and `<|semantic:0|>` at 151678, a tiny
test tokenizer puts them elsewhere, and both work the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tokenizers

from runtime.errors import CheckpointError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VOICE = "<|voice|>"


def semantic_token(i: int) -> str:
    return f"<|semantic:{i}|>"


@dataclass(frozen=True)
class SpecialIds:
    im_start: int
    im_end: int
    voice: int
    semantic_begin: int  # id of <|semantic:0|>
    semantic_end: int  # id of the last <|semantic:i|>


class Tokenizer:
    """Byte-level BPE from tokenizer.json; `encode` never adds BOS/EOS and matches special tokens inline."""

    def __init__(self, path: str | Path):
        path = Path(path)
        try:
            self._tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception for missing or malformed files
            reason = "not found" if not path.exists() else f"not a valid tokenizer.json ({exc})"
            raise CheckpointError(f"{path}: {reason}") from None
        self.ids = self._find_special_ids(path)

    def _id(self, token: str, path: Path) -> int:
        token_id = self._tk.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"{path}: special token {token} is missing")
        return token_id

    def _find_special_ids(self, path: Path) -> SpecialIds:
        begin = self._id(semantic_token(0), path)
        n = 0
        while (token_id := self._tk.token_to_id(semantic_token(n))) is not None:
            if token_id != begin + n:
                raise CheckpointError(f"{path}: {semantic_token(n)} has id {token_id}, expected {begin + n}")
            n += 1
        return SpecialIds(
            im_start=self._id(IM_START, path),
            im_end=self._id(IM_END, path),
            voice=self._id(VOICE, path),
            semantic_begin=begin,
            semantic_end=begin + n - 1,
        )

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tk.decode(ids, skip_special_tokens=False)

    def __len__(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)
