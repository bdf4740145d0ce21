"""What the chat formats and the detokenizer need from a tokenizer: a small protocol.

The tokenizers implement it; the formats and the detokenizer depend only on it, so nothing in
`text/` imports in a circle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Codec(Protocol):
    bos_id: int | None
    eos_id: int
    eos_ids: set[int]
    vocab_size: int
    chat_template: str | None
    add_bos: bool
    sentencepiece: bool  # a sentencepiece vocabulary (Mistral's own format, v1 chat)

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, control tokens left out."""
        ...

    def token_id(self, piece: str) -> int | None:
        """The id of a special / control token, or None if the vocabulary lacks it."""
        ...

    def decode_piece(self, token: int) -> str:
        """The vocabulary entry of one token, as written (`<s>`, `<|im_end|>` ...)."""
        ...
