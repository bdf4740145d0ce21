"""One tokenizer interface over sentencepiece and Hugging Face `tokenizers`.

- `tokenizer.model` (Mistral v1 / v3 vocabularies): sentencepiece, exactly as mistral-common;
- `tokenizer.json`: the `tokenizers` library;
- a GGUF file's embedded vocabulary: rebuilt as one of these in `gguf_vocab.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import TokenizerError
from ..jsonfile import read_json_object
from .chat_format import apply_chat_template, detect_chat_format
from .detokenizer import StreamingDetokenizer


class Tokenizer:
    """What generation and chat need from a tokenizer, whatever its source (see `Codec`)."""

    bos_id: int | None
    eos_id: int
    eos_ids: set[int]
    vocab_size: int
    chat_template: str | None = None
    add_bos: bool = True
    sentencepiece: bool = False

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def token_id(self, piece: str) -> int | None:
        raise NotImplementedError

    def decode_piece(self, token: int) -> str:
        raise NotImplementedError

    # Hugging Face style entry point; the formats live in chat_format.py.
    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True, tokenize: bool = True,
                            chat_format: str | None = None) -> list[int] | str:
        return apply_chat_template(self, messages, add_generation_prompt=add_generation_prompt,
                                   tokenize=tokenize, chat_format=chat_format)

    @property
    def chat_format(self) -> str:
        return detect_chat_format(self)

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `tokenizer.model`, used exactly as mistral-common uses it."""

    def __init__(self, path: str | Path | None, config: dict[str, Any] | None = None,
                 model_proto: bytes | None = None) -> None:
        import sentencepiece

        try:
            if model_proto is not None:
                self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
            else:
                self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a sentencepiece model ({e})") from None
        self.sentencepiece = True
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id()
        self.eos_ids = {self.eos_id}
        config = config or {}
        self.chat_template = config.get("chat_template")
        self.add_bos = config.get("add_bos_token", True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def decode_piece(self, token: int) -> str:
        return self.sp.id_to_piece(token)

    def token_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() or not self.sp.is_control(i) else i


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (from `tokenizer.json` or rebuilt from a GGUF vocabulary)."""

    def __init__(self, tokenizer: Any, config: dict[str, Any]) -> None:
        self.tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._id_of(config.get("bos_token"))
        eos = self._id_of(config.get("eos_token"))
        if eos is None:
            raise TokenizerError("the tokenizer names no end-of-sequence token")
        self.eos_id = eos
        extra = config.get("eos_token_ids") or []
        self.eos_ids = {eos, *(i for i in extra if isinstance(i, int))}
        self.chat_template = config.get("chat_template")
        self.add_bos = bool(config.get("add_bos_token", self.bos_id is not None))

    def _id_of(self, token: Any) -> int | None:
        if isinstance(token, dict):  # {"content": "<s>", ...} in older tokenizer_config.json
            token = token.get("content")
        if isinstance(token, int):
            return token
        return self.tok.token_to_id(token) if isinstance(token, str) else None

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def decode_piece(self, token: int) -> str:
        return self.tok.id_to_token(token) or ""

    def token_id(self, piece: str) -> int | None:
        i = self.tok.token_to_id(piece)
        added = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        return i if piece in added else None


def _read_json(path: Path) -> dict[str, Any]:
    """A side file's settings; a missing file has none."""
    return read_json_object(path, TokenizerError) if path.is_file() else {}


def _folder_config(folder: Path) -> dict[str, Any]:
    config = _read_json(folder / "tokenizer_config.json")
    template = folder / "chat_template.jinja"
    if template.is_file() and not config.get("chat_template"):
        config["chat_template"] = template.read_text(encoding="utf-8")
    eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    config["eos_token_ids"] = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return config


# The files a model folder's tokenizer comes from, in the order they are looked for.
VOCABULARY_FILES = ("tokenizer.model", "tokenizer.json")


def vocabulary_file(folder: Path) -> str | None:
    """The file `folder`'s tokenizer would come from, or None."""
    return next((n for n in VOCABULARY_FILES if (folder / n).is_file()), None)


def load_folder_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer of a model folder: `tokenizer.model` first (the Mistral reference), else
    `tokenizer.json`."""
    config = _folder_config(folder)
    if (folder / "tokenizer.model").is_file():
        return SentencePieceTokenizer(folder / "tokenizer.model", config)
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as RustTokenizer

        try:
            tok = RustTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions
            raise TokenizerError(f"{folder / 'tokenizer.json'}: unreadable ({e}); download it "
                                 "again") from None
        return HFTokenizer(tok, config)
    raise no_tokenizer(folder)


def no_tokenizer(folder: Path) -> TokenizerError:
    """What a model folder without tokenizer files is told."""
    return TokenizerError(f"{folder}: no {' or '.join(VOCABULARY_FILES)} in the folder; copy "
                          "the model's tokenizer files into it")
