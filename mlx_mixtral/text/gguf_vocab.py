"""Tokenizers rebuilt from the vocabulary a GGUF file embeds (it has no tokenizer files).

- `llama`: a sentencepiece BPE model taken apart (pieces, scores, types); put back together, it
  tokenizes exactly as the original `tokenizer.model`.
- `gpt2`: byte-level BPE (tokens and merges), rebuilt with the `tokenizers` library, split as
  llama.cpp's pre-tokenizer type says.

Metadata values may be MLX arrays (from `mx.load`); `.tolist()` turns them into Python values
without this module importing MLX.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import TokenizerError
from .tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else value


def _sentencepiece_from_gguf(path: Path, metadata: dict[str, Any]) -> SentencePieceTokenizer:
    model, config = _sentencepiece_model(path, metadata)
    return SentencePieceTokenizer(path, config, model_proto=model)


def _sentencepiece_model(path: Path, metadata: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """A `llama` GGUF vocabulary is a sentencepiece BPE model taken apart (pieces, scores,
    types): put back together (the bytes of its tokenizer.model), it tokenizes exactly as the
    original. With its tokenizer_config.json settings."""
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
    return model.SerializeToString(), config


# How llama.cpp's pre-tokenizer types split text before byte-level BPE (the regex the merges
# were learned on). Types not listed use GPT-2's own split.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
                        "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
                        "pixtral": _LLAMA3_SPLIT, "tekken": _TEKKEN_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the rest move past 255."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _byte_level_bpe(path: Path, metadata: dict[str, Any]) -> Any:
    """A `tokenizers.Tokenizer` for a `gpt2` GGUF vocabulary: BPE over GPT-2's byte alphabet,
    control tokens kept whole as special tokens, user-defined ones whole as added tokens."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    tokens = _plain(metadata.get("tokenizer.ggml.tokens")) or []
    merges = _plain(metadata.get("tokenizer.ggml.merges")) or []
    types = _plain(metadata.get("tokenizer.ggml.token_type")) or [1] * len(tokens)
    if not tokens or not merges or len(types) != len(tokens):
        raise TokenizerError(f"{path}: the GGUF vocabulary is incomplete (tokens, merges or "
                             "token types missing)")
    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    try:
        bpe = models.BPE(vocab,
                         [tuple(m.split(" ", 1)) for m in merges], ignore_merges=False)
    except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions
        raise TokenizerError(f"{path}: cannot rebuild the GGUF vocabulary ({e})") from None
    tok = RustTokenizer(bpe)
    split = PRE_TOKENIZER_SPLITS.get(_plain(metadata.get("tokenizer.ggml.pre")))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # A "control" token outside the byte alphabet is a llama.cpp mislabel: left alone.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, k in zip(tokens, types, strict=True)
                            if k == _CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, k in zip(tokens, types, strict=True) if k == _USER_DEFINED])
    return tok


def load_gguf_tokenizer(path: Path, metadata: dict[str, Any]) -> Tokenizer:
    """The vocabulary a GGUF file embeds: `llama` (sentencepiece) or `gpt2` (byte-level BPE)."""
    kind = _plain(metadata.get("tokenizer.ggml.model"))
    if kind == "llama":
        return _sentencepiece_from_gguf(path, metadata)
    if kind != "gpt2":
        raise TokenizerError(f"{path}: GGUF tokenizer type {kind!r} is not supported "
                             "(expected 'llama' or 'gpt2')")
    return HFTokenizer(_byte_level_bpe(path, metadata), _byte_level_config(metadata))


def _byte_level_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """A `gpt2` vocabulary's tokenizer_config.json settings."""
    tokens = _plain(metadata.get("tokenizer.ggml.tokens")) or []

    def piece(key: str) -> str | None:
        i = _plain(metadata.get(key))
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    add_bos = _plain(metadata.get("tokenizer.ggml.add_bos_token"))
    return {
        "bos_token": piece("tokenizer.ggml.bos_token_id"),
        "eos_token": piece("tokenizer.ggml.eos_token_id"),
        "chat_template": _plain(metadata.get("tokenizer.chat_template")),
        "add_bos_token": True if add_bos is None else bool(add_bos),
    }


def gguf_tokenizer_files(path: Path, metadata: dict[str, Any]) -> dict[str, bytes]:
    """The vocabulary a GGUF file embeds as a model folder's files, which load as the GGUF's
    own tokenizer does (here, and in transformers): tokenizer.model (`llama`) or
    tokenizer.json (`gpt2`), and tokenizer_config.json."""
    import json

    kind = _plain(metadata.get("tokenizer.ggml.model"))
    if kind == "llama":
        model, config = _sentencepiece_model(path, metadata)
        files = {"tokenizer.model": model}
        config["tokenizer_class"] = "LlamaTokenizer"
    elif kind == "gpt2":
        files = {"tokenizer.json": _byte_level_bpe(path, metadata).to_str().encode()}
        config = {**_byte_level_config(metadata), "tokenizer_class": "PreTrainedTokenizerFast"}
    else:
        raise TokenizerError(f"{path}: GGUF tokenizer type {kind!r} is not supported "
                             "(expected 'llama' or 'gpt2')")
    config = {k: v for k, v in config.items() if v is not None}
    return {**files, "tokenizer_config.json": json.dumps(config, indent=2).encode()}
