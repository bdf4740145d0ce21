"""Streaming detokenization over random token sequences: the real Mistral v1 vocabulary
(sentencepiece with byte fallback) and the SmolLM2 GGUF vocabulary (byte-level BPE)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_chat_format import OURS

from mlx_mixtral.demo import demo_model_path
from mlx_mixtral.text.gguf_vocab import load_gguf_tokenizer


def smollm2():
    path = demo_model_path()
    _, metadata = mx.load(str(path), return_metadata=True)
    return load_gguf_tokenizer(path, metadata)


TOKENIZERS = {"mistral-v1": OURS["mistral-v1"], "smollm2": smollm2()}


def byte_token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


@st.composite
def token_sequences(draw, tokenizer):
    """Random ids, biased towards multi-byte text so characters get split across tokens."""
    vocab = tokenizer.vocab_size
    words = ["안녕하세요", "你好世界", "👋🏽 emoji", "naïve café", " spaced  out ", "\n\ncode:"]
    parts = draw(st.lists(st.one_of(
        st.lists(st.integers(0, vocab - 1), min_size=1, max_size=4),
        st.sampled_from(words).map(tokenizer.encode),
    ), min_size=1, max_size=8))
    return [t for part in parts for t in part]


def stream(tokenizer, ids):
    detok = tokenizer.detokenizer()
    pieces = [detok.add_token(t) for t in ids]
    pieces.append(detok.finalize())
    return pieces


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_pieces_join_to_the_full_decode(name, data):
    tokenizer = TOKENIZERS[name]
    ids = data.draw(token_sequences(tokenizer))
    pieces = stream(tokenizer, ids)
    full = tokenizer.decode(ids)
    assert "".join(pieces) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_text_comes_out_as_tokens_arrive(name):
    tokenizer = TOKENIZERS[name]
    ids = tokenizer.encode("Hello world, this is streaming 你好")
    pieces = stream(tokenizer, ids)
    assert sum(1 for p in pieces[:-1] if p) >= len(ids) // 2  # not all held to the end
    assert "".join(pieces) == "Hello world, this is streaming 你好"


def test_llama_type_gguf_vocabulary_encodes_like_sentencepiece(tmp_path):
    """A Mistral GGUF carries a `llama` (SentencePiece-style) vocabulary: rebuilt from the
    metadata, it must tokenize as the tokenizer.model it came from."""
    import gguf
    import sentencepiece
    from test_chat_format import VERSIONS

    sp = sentencepiece.SentencePieceProcessor(model_file=str(VERSIONS["mistral-v1"]))
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    kinds = [gguf.TokenType.CONTROL if sp.is_control(i) else gguf.TokenType.UNKNOWN
             if sp.is_unknown(i) else gguf.TokenType.BYTE if sp.is_byte(i)
             else gguf.TokenType.NORMAL for i in range(sp.vocab_size())]
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
    writer.add_token_types(kinds)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _, metadata = mx.load(str(path), return_metadata=True)
    tokenizer = load_gguf_tokenizer(path, metadata)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    for text in ["Hello world", "The capital of France is Paris.", "naïve café 你好 👋",
                 "  two  spaces\nnew line", "[INST] hi [/INST]"]:
        assert tokenizer.encode(text) == sp.encode(text), text
        assert tokenizer.decode(sp.encode(text)) == sp.decode(sp.encode(text))
