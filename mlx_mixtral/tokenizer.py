"""One tokenizer interface over sentencepiece, Hugging Face `tokenizers` and GGUF vocabularies.

- `tokenizer.model` (Mistral v1 / v3 vocabularies): sentencepiece, exactly as mistral-common;
- `tokenizer.json`: the `tokenizers` library;
- a GGUF file's embedded vocabulary (`llama` SentencePiece-style or `gpt2` byte-level BPE):
  transformers rebuilds it as a `tokenizers` tokenizer.

Chat formatting lives in `chat_format.py`; streaming decoding in `detokenizer.py`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import TokenizerError


class Tokenizer:
    """What generation and chat need from a tokenizer, whatever its source."""

    bos_id: int | None
    eos_id: int
    eos_ids: set[int]
    vocab_size: int
    chat_template: str | None = None
    add_bos: bool = True

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, control tokens left out."""
        raise NotImplementedError

    def token_id(self, piece: str) -> int | None:
        """The id of a special / control token, or None if the vocabulary lacks it."""
        raise NotImplementedError

    def decode_piece(self, token: int) -> str:
        """The vocabulary entry of one token, as written (`<s>`, `<|im_end|>` ...)."""
        raise NotImplementedError

    # Hugging Face style entry point; the formats live in chat_format.py.
    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True, tokenize: bool = True,
                            chat_format: str | None = None) -> list[int] | str:
        from .chat_format import apply_chat_template

        return apply_chat_template(self, messages, add_generation_prompt=add_generation_prompt,
                                   tokenize=tokenize, chat_format=chat_format)

    @property
    def chat_format(self) -> str:
        from .chat_format import detect_chat_format

        return detect_chat_format(self)

    def detokenizer(self):
        from .detokenizer import StreamingDetokenizer

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
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _folder_config(folder: Path) -> dict[str, Any]:
    config = _read_json(folder / "tokenizer_config.json")
    template = folder / "chat_template.jinja"
    if template.is_file() and not config.get("chat_template"):
        config["chat_template"] = template.read_text(encoding="utf-8")
    eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    config["eos_token_ids"] = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return config


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
    raise TokenizerError(f"{folder}: no tokenizer.model or tokenizer.json in the folder; copy "
                         "the model's tokenizer files into it")


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else value


def _sentencepiece_from_gguf(path: Path, metadata: dict[str, Any]) -> SentencePieceTokenizer:
    """A `llama` GGUF vocabulary is a sentencepiece BPE model taken apart (pieces, scores,
    types): put it back together, so it tokenizes exactly as the original tokenizer.model."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens = _plain(metadata.get("tokenizer.ggml.tokens")) or []
    scores = _plain(metadata.get("tokenizer.ggml.scores")) or [0.0] * len(tokens)
    types = _plain(metadata.get("tokenizer.ggml.token_type")) or [1] * len(tokens)
    if not (len(tokens) == len(scores) == len(types)) or not tokens:
        raise TokenizerError(f"{path}: the GGUF vocabulary is incomplete")
    model = pb.ModelProto()
    model.trainer_spec.model_type = pb.TrainerSpec.BPE
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.vocab_size = len(tokens)
    for key, field in (("unknown", "unk_id"), ("bos", "bos_id"), ("eos", "eos_id"),
                       ("padding", "pad_id")):
        value = _plain(metadata.get(f"tokenizer.ggml.{key}_token_id"))
        setattr(model.trainer_spec, field, int(value) if value is not None else -1)
    model.normalizer_spec.name = "identity"
    add_space = _plain(metadata.get("tokenizer.ggml.add_space_prefix"))
    model.normalizer_spec.add_dummy_prefix = True if add_space is None else bool(add_space)
    model.normalizer_spec.remove_extra_whitespaces = False
    model.normalizer_spec.escape_whitespaces = True
    for token, score, kind in zip(tokens, scores, types, strict=True):
        piece = model.pieces.add()
        piece.piece, piece.score = token, float(score)
        piece.type = kind if kind in (1, 2, 3, 4, 5, 6) else 1  # GGUF uses sentencepiece's enum
    add_bos = _plain(metadata.get("tokenizer.ggml.add_bos_token"))
    config = {"chat_template": _plain(metadata.get("tokenizer.chat_template")),
              "add_bos_token": True if add_bos is None else bool(add_bos)}
    return SentencePieceTokenizer(path, config, model_proto=model.SerializeToString())


def load_gguf_tokenizer(path: Path, metadata: dict[str, Any]) -> Tokenizer:
    """The vocabulary a GGUF file embeds: `llama` (sentencepiece) or `gpt2` (byte-level BPE)."""
    kind = _plain(metadata.get("tokenizer.ggml.model"))
    if kind == "llama":
        return _sentencepiece_from_gguf(path, metadata)
    if kind != "gpt2":
        raise TokenizerError(f"{path}: GGUF tokenizer type {kind!r} is not supported "
                             "(expected 'llama' or 'gpt2')")
    try:  # transformers' converter, fed our metadata (its own reader needs torch)
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError as e:
        raise TokenizerError(f"{path}: this transformers cannot rebuild GGUF vocabularies "
                             f"({e}); pass a model folder with tokenizer files") from None
    tok_dict = {name: _plain(metadata[f"tokenizer.{key}"])
                for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
                if f"tokenizer.{key}" in metadata}
    try:
        backend, _ = convert_gguf_tokenizer(_plain(metadata["general.architecture"]), tok_dict)
    except Exception as e:  # noqa: BLE001 - any failure means no usable vocabulary
        raise TokenizerError(f"{path}: cannot rebuild the GGUF vocabulary ({e})") from None
    tokens = _plain(metadata.get("tokenizer.ggml.tokens")) or []

    def piece(key: str) -> str | None:
        i = _plain(metadata.get(key))
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    add_bos = _plain(metadata.get("tokenizer.ggml.add_bos_token"))
    config = {
        "bos_token": piece("tokenizer.ggml.bos_token_id"),
        "eos_token": piece("tokenizer.ggml.eos_token_id"),
        "chat_template": _plain(metadata.get("tokenizer.chat_template")),
        "add_bos_token": True if add_bos is None else bool(add_bos),
    }
    return HFTokenizer(backend, config)
