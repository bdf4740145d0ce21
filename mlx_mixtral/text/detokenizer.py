"""Streaming detokenization: text as tokens arrive, never a broken UTF-8 character.

Decoding token by token goes wrong two ways: byte-fallback tokens (emoji, Korean, Chinese) decode
to U+FFFD until the whole character has arrived, and sentencepiece drops the leading space of a
sequence's first word. So each step decodes a short window that starts at the last emitted
boundary, and emits only what the window adds beyond what it had, once it does not end in an
incomplete character. The pieces joined are the full decode.

(mlx-lm's detokenizers take a Hugging Face tokenizer's vocabulary and decoder; this one works
on any `Codec.decode`, so sentencepiece models, tokenizer.json and GGUF vocabularies share it.)
"""

from __future__ import annotations

from .protocol import Codec

REPLACEMENT = "\ufffd"


class StreamingDetokenizer:
    def __init__(self, tokenizer: Codec) -> None:
        self.tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.start = 0  # window start: the token after the last emitted boundary
        self.emitted = 0  # characters of the window's decode already emitted

    def add_token(self, token: int) -> str:
        """Add a token; return the new text it completes (maybe "")."""
        self.tokens.append(token)
        window = self.tokenizer.decode(self.tokens[self.start:])
        if window.endswith(REPLACEMENT):
            return ""  # an incomplete character: wait for its other bytes
        piece = window[self.emitted:]
        # Move the window forward: the next decode starts at the last token, which gives
        # sentencepiece the context to keep that token's leading space.
        last = self.tokenizer.decode(self.tokens[-1:]) if len(self.tokens) > self.start else ""
        if window.endswith(last) and last:
            self.start = len(self.tokens) - 1
            self.emitted = len(last)
        else:
            self.emitted = len(window)
        return piece

    def finalize(self) -> str:
        """The rest of the text (an incomplete character, if the stream ended in one)."""
        window = self.tokenizer.decode(self.tokens[self.start:])
        piece = window[self.emitted:]
        self.start, self.emitted = len(self.tokens), 0
        return piece
