"""The [INST] chat formats, token for token against mistral-common (the real tokenizer files)."""

from __future__ import annotations

from pathlib import Path

import mistral_common
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mlx_mixtral.errors import ChatFormatError
from mlx_mixtral.text.tokenizer import SentencePieceTokenizer

DATA = Path(mistral_common.__file__).parent / "data"
VERSIONS = {
    "mistral-v1": DATA / "tokenizer.model.v1",
    "mistral-v3": DATA / "mistral_instruct_tokenizer_240323.model.v3",
}
OURS = {v: SentencePieceTokenizer(p) for v, p in VERSIONS.items()}
THEIRS = {v: MistralTokenizer.from_file(str(p)) for v, p in VERSIONS.items()}

text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40
).filter(lambda s: s.strip())
padded = st.builds(lambda pre, s, post: pre + s + post,
                   st.sampled_from(["", " ", "  ", "\n"]), text,
                   st.sampled_from(["", " ", "  ", "\n", " \n "]))
multiline = st.lists(padded, min_size=1, max_size=3).map("\n".join)
content = st.one_of(padded, multiline, st.sampled_from(["Bonjour 👋", "안녕하세요", "你好，世界",
                                                        "[INST] nested [/INST]", "</s><s>"]))


@st.composite
def conversations(draw):
    turns = draw(st.integers(1, 6))
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(content)})
    for i in range(turns):
        messages.append({"role": "user", "content": draw(content)})
        if i < turns - 1:
            messages.append({"role": "assistant", "content": draw(content)})
    return messages


def reference(version: str, messages: list[dict[str, str]]) -> list[int]:
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"])
                                              for m in messages])
    return THEIRS[version].encode_chat_completion(request).tokens


@pytest.mark.parametrize("version", sorted(VERSIONS))
@settings(max_examples=300, deadline=None)
@given(messages=conversations())
def test_token_exact_with_mistral_common(version, messages):
    ours = OURS[version].apply_chat_template(messages, add_generation_prompt=True)
    assert ours == reference(version, messages)


def test_version_detected_from_the_tokenizer():
    assert OURS["mistral-v1"].chat_format == "mistral-v1"
    assert OURS["mistral-v3"].chat_format == "mistral-v3"
    assert OURS["mistral-v3"].token_id("[INST]") == 3
    assert OURS["mistral-v1"].token_id("[INST]") is None


def test_override_and_refusals():
    messages = [{"role": "user", "content": "hi"}]
    v1_on_v3 = OURS["mistral-v3"].apply_chat_template(messages, chat_format="mistral-v1")
    assert v1_on_v3 == [1, *OURS["mistral-v3"].encode("[INST] hi [/INST]")]
    with pytest.raises(ChatFormatError, match="needs \\[INST\\] control tokens"):
        OURS["mistral-v1"].apply_chat_template(messages, chat_format="mistral-v3")
    with pytest.raises(ChatFormatError, match="no user message"):
        OURS["mistral-v1"].apply_chat_template([{"role": "system", "content": "x"}])
    with pytest.raises(ChatFormatError, match="unknown role 'tool'"):
        OURS["mistral-v1"].apply_chat_template([{"role": "tool", "content": "x"}])


def test_text_rendering():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert OURS["mistral-v1"].apply_chat_template(messages, tokenize=False) == (
        "<s>[INST] Be brief.\n\nHi [/INST]Hello!</s>[INST] Bye [/INST]")
    assert OURS["mistral-v3"].apply_chat_template(messages, tokenize=False) == (
        "<s>[INST]Hi[/INST]Hello!</s>[INST]Be brief.\n\nBye[/INST]")
