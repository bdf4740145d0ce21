"""Structured output: a JSON schema (or any JSON) enforced while decoding, with llguidance.

llguidance compiles the schema into a matcher over our vocabulary; before each token the matcher
gives the set of tokens that keep the output valid, and the logits of every other token become
-inf. So the output always parses and validates (unless `max_tokens` cuts it short, which the
finish reason "length" says).

The vocabulary is handed over once per tokenizer (about a second for 32k tokens) and kept.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import GenerationError
from ..text.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer
from ..text.tool_formats import CallSyntax

_lock = threading.Lock()
MARKER = "\u263a"  # a character no real text starts with
_vocabularies: dict[tuple[int, int], Any] = {}  # (id(tokenizer), vocab size) -> LLTokenizer
_specials: dict[int, np.ndarray] = {}  # id(LLTokenizer) -> its special tokens' ids


class _SentencePieceVocabulary:
    """What llguidance's `TokenizerWrapper` reads: each token's bytes, EOS/BOS, an encoder."""

    def __init__(self, tokenizer: SentencePieceTokenizer, vocab_size: int) -> None:
        sp = tokenizer.sp
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for i in range(vocab_size):
            if i >= sp.vocab_size() or sp.is_control(i) or sp.is_unknown(i):
                self.tokens.append(b"")
                self.special_token_ids.append(i)
            elif sp.is_byte(i):
                self.tokens.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))
            else:
                self.tokens.append(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        self._sp = sp

    def __call__(self, text: str) -> list[int]:
        # Without sentencepiece's dummy-prefix space: text is encoded after a marker that is
        # then cut off (as mistral-common encodes infill text).
        marker = self._sp.encode(MARKER)
        ids = self._sp.encode(MARKER + text)
        return ids[len(marker):] if ids[:len(marker)] == marker else self._sp.encode(text)


def vocabulary(tokenizer: Tokenizer, vocab_size: int) -> Any:
    """llguidance's view of `tokenizer`, made once."""
    import llguidance

    key = (id(tokenizer), vocab_size)
    with _lock:
        if key not in _vocabularies:
            eos = sorted(tokenizer.eos_ids)
            if isinstance(tokenizer, HFTokenizer):
                made = llguidance.LLTokenizer(tokenizer.tok.to_str(), n_vocab=vocab_size,
                                              eos_token=eos)
            elif isinstance(tokenizer, SentencePieceTokenizer):
                from llguidance._tokenizer import TokenizerWrapper

                made = llguidance.LLTokenizer(
                    TokenizerWrapper(_SentencePieceVocabulary(tokenizer, vocab_size)),
                    n_vocab=vocab_size, eos_token=eos)
            else:
                raise GenerationError("structured output needs a sentencepiece or "
                                      "tokenizer.json vocabulary")
            _vocabularies[key] = made
        return _vocabularies[key]


# Keywords whose value is one schema, or a list or a map of schemas: where `as_llama_cpp` looks
# for objects. (Not allOf: its parts describe one object together, so none may close it alone.)
_ONE = ("items", "additionalItems", "not", "if", "then", "else", "contains",
        "additionalProperties", "unevaluatedProperties", "propertyNames")
_LISTS = ("anyOf", "oneOf", "prefixItems")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


INTEGER_DIGITS = 16  # llama.cpp's integral part: [0-9] | [1-9] [0-9]{0,15}


def as_llama_cpp(schema: Any) -> Any:
    """`schema` as llama.cpp's schema-to-grammar (llama-server, Ollama) applies it: an object
    that declares `properties` and does not say `additionalProperties` takes no other keys
    (Pydantic's `model_json_schema()` leaves it out; without this the model may add keys), and
    an integer without bounds has at most 16 digits (else a model may write digits forever)."""
    if isinstance(schema, list):
        return [as_llama_cpp(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _ONE:
        if isinstance(out.get(key), dict):
            out[key] = as_llama_cpp(out[key])
    for key in _LISTS:
        if isinstance(out.get(key), list):
            out[key] = as_llama_cpp(out[key])
    for key in _MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: as_llama_cpp(v) for k, v in out[key].items()}
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [{**as_llama_cpp(s), "additionalProperties": s.get(
            "additionalProperties", True)} if isinstance(s, dict) else s for s in out["allOf"]]
    if out.get("type") == "integer" and not any(k in out for k in _BOUNDS):
        out["minimum"], out["maximum"] = -(10**INTEGER_DIGITS - 1), 10**INTEGER_DIGITS - 1
    if "properties" in out and "additionalProperties" not in out \
            and "unevaluatedProperties" not in out and "allOf" not in out:
        out["additionalProperties"] = False
    return out


def checked(grammar: str, tokenizer: Tokenizer | None, vocab_size: int, what: str) -> str:
    """`grammar`, if llguidance can use it (with `tokenizer`'s vocabulary when given);
    else GenerationError saying why, as `what` ("the JSON schema", "the grammar")."""
    import llguidance

    words = vocabulary(tokenizer, vocab_size) if tokenizer is not None else None
    problem = llguidance.LLMatcher.validate_grammar(grammar, words)
    if problem and not problem.startswith("WARNING"):
        raise GenerationError(f"{what} cannot be used: {problem}")
    return grammar


def json_grammar(schema: dict[str, Any] | None, tokenizer: Tokenizer | None = None,
                 vocab_size: int = 0) -> str:
    """The llguidance grammar for JSON that validates against `schema` (None: any object),
    applied as `as_llama_cpp` says. A schema llguidance refuses raises GenerationError with its
    reason (checked against the vocabulary too when `tokenizer` is given)."""
    import llguidance

    wanted = as_llama_cpp(schema) if schema is not None else {"type": "object"}
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            wanted, defaults={"whitespace_flexible": False})
    except (ValueError, TypeError, RuntimeError) as e:
        raise GenerationError(f"the JSON schema cannot be used: {e}") from None
    return checked(grammar, tokenizer, vocab_size, "the JSON schema")


def gbnf_grammar(gbnf: str, tokenizer: Tokenizer | None = None, vocab_size: int = 0) -> str:
    """llama.cpp's GBNF grammar (its `grammar` field), converted to llguidance's Lark."""
    import llguidance

    try:
        grammar = llguidance.grammar_from("gbnf", gbnf)
    except (ValueError, TypeError, RuntimeError) as e:
        raise GenerationError(f"the grammar cannot be used: {e}") from None
    return checked(grammar, tokenizer, vocab_size, "the grammar")


def _literal(text: str) -> str:
    """`text` as a Lark regex matching it exactly."""
    return re.escape(text).replace("/", "\\/")


def call_grammar(syntax: CallSyntax, text_allowed: bool, tokenizer: Tokenizer | None = None,
                 vocab_size: int = 0) -> str:
    """Tool calls as a Lark grammar: the model's call syntax (its `call` rule, with JSON
    following each of its schemas, closed as `as_llama_cpp` says), or, when `text_allowed`,
    free text instead, which may not start as a call does."""
    # Spaced as json.dumps writes (and mistral-common and templates re-encode) calls; no other
    # whitespace, which a random model would otherwise pile up.
    layout = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    lark = f'start: {"text | " if text_allowed else ""}call\n{syntax.rules}'
    for rule, schema in syntax.json.items():
        closed = json.dumps({**as_llama_cpp(schema), "x-guidance": layout}, ensure_ascii=False)
        lark += f"{rule}: %json {closed}\n"
    if text_allowed:
        # (A call's first token, when special, is no text anyway; written as text, it would
        # start a call the grammar does not hold to the schemas.)
        text = "/(.|\\n)+/" + "".join(f" & ~/{_literal(s)}(.|\\n)*/"
                                       for s in syntax.text_starts)
        lark += f"text: TEXT?\nTEXT: {text}\n"
    return checked(lark, tokenizer, vocab_size, "the tools' parameter schemas")


def special_ids(words: Any) -> np.ndarray:
    """The ids of `words`' special tokens (an LLTokenizer's), found once."""
    with _lock:
        if id(words) not in _specials:
            _specials[id(words)] = np.array([i for i in range(words.vocab_size)
                                             if words.is_special_token(i)], dtype=np.int64)
        return _specials[id(words)]


class GrammarMask:
    """An mlx-lm logits processor that allows only the tokens the grammar accepts next.

    mlx-lm calls it with every token of this generation so far (the `prompt_length` prompt
    tokens it was given, then the sampled ones) and the logits of the next token."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, grammar: str,
                 prompt_length: int) -> None:
        import llguidance
        from llguidance.numpy import allocate_token_bitmask

        words = vocabulary(tokenizer, vocab_size)
        self.matcher = llguidance.LLMatcher(words, grammar)
        self.specials = np.setdiff1d(special_ids(words), sorted(tokenizer.eos_ids))
        if self.matcher.is_error():
            raise GenerationError(f"the JSON schema cannot be used: "
                                  f"{self.matcher.get_error()}")
        self.vocab_size = vocab_size
        self.prompt_length = prompt_length
        self.consumed = 0
        self.bitmask = allocate_token_bitmask(1, vocab_size)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        from llguidance.numpy import fill_next_token_bitmask

        new = tokens[self.prompt_length + self.consumed:].tolist()
        for token in new:
            if not self.matcher.consume_token(token):
                raise GenerationError(f"the grammar refused token {token}: "
                                      f"{self.matcher.get_error()}")
        self.consumed += len(new)
        fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        allowed = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")
        # Where a grammar allows one special token (a tool call's) beside free text, the mask
        # lets every special token through; each is checked on its own (but the end tokens,
        # which the matcher allows only where the grammar may end).
        for token in self.specials[allowed[self.specials] == 1]:
            if not self.matcher.validate_tokens([int(token)]):
                allowed[token] = 0
        allowed = mx.array(allowed[: logits.shape[-1]].astype(np.bool_))
        return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))

