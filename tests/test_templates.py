"""Chat templates render as transformers renders them, and GGUF byte-level vocabularies
tokenize as transformers' own GGUF converter builds them."""

from __future__ import annotations

import json
import time

import mlx.core as mx
import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from mlx_mixtral.demo import demo_model_path
from mlx_mixtral.errors import ChatFormatError
from mlx_mixtral.text.gguf_vocab import load_gguf_tokenizer
from mlx_mixtral.text.template import render_template

SMOLLM2 = demo_model_path()
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Name a cheese."}, {"role": "assistant", "content": "Brie."},
     {"role": "user", "content": "Another, çà et là — 日本語 🧀"}],
]
# What transformers gives templates beyond plain Jinja.
FEATURES = (
    "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
    "{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{{ m | tojson }}|{{ m | tojson(indent=2, sort_keys=True) }}|"
    "{{ {'a': 'é', 'b': [1, 2]} | tojson(separators=(',', ':')) }}\n{% endfor %}"
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
    "{{ ns.n }} {{ strftime_now('%Y') }}{% if add_generation_prompt %}>{% endif %}"
)


@pytest.fixture(scope="module")
def metadata():
    _, meta = mx.load(str(SMOLLM2), return_metadata=True)
    return meta


def theirs(template: str, messages, add_generation_prompt=True, **tokens) -> str:
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=add_generation_prompt, **tokens)
    return rendered[0]


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_smollm2_template_renders_as_transformers(metadata, conversation, generation_prompt):
    tok = load_gguf_tokenizer(SMOLLM2, metadata)
    messages = CONVERSATIONS[conversation]
    ours = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                   tokenize=False, chat_format="template")
    template = str(metadata["tokenizer.chat_template"])
    assert ours == theirs(template, messages, generation_prompt,
                          bos_token="<|im_start|>", eos_token="<|im_end|>")


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_template_extras_render_as_transformers(conversation):
    messages = CONVERSATIONS[conversation]
    ours = render_template(FEATURES, messages, True, bos_token="<s>", eos_token="</s>")
    assert ours == theirs(FEATURES, messages, bos_token="<s>", eos_token="</s>")
    # What the template says, worked out by hand: the first two messages, system ones
    # skipped, each as JSON (non-ASCII kept), then the message count and the year.
    shown = [m for m in messages[:2] if m["role"] != "system"]
    assert ours.count('{"a":"é","b":[1,2]}') == len(shown)
    for m in shown:
        assert json.dumps(m, ensure_ascii=False) + "|" in ours
    assert ours.endswith(f"{len(messages)} {time.strftime('%Y')}>")


@pytest.mark.parametrize("template", [
    "{{ raise_exception('no system role') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # sandbox escape attempt
    "{% set ns = namespace(_x=1) %}",
])
def test_template_refusals_are_chat_format_errors(template):
    with pytest.raises(ChatFormatError):
        render_template(template, CONVERSATIONS[0], True, bos_token="", eos_token="")


TEXTS = ["Hello world", "  leading spaces and\ttabs\n\nnew lines", "<|im_start|>user\nhi<|im_end|>",
         "çà et là — 日本語 🧀 emoji", "def f(x):\n    return x**2  # code", "1234567 numbers 3.14",
         "I'm can't we'll they've", "<think>user-defined?</think>", ""]


def test_gguf_byte_level_vocabulary_matches_transformers(metadata):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    def plain(v):
        return v.tolist() if hasattr(v, "tolist") else v

    assert plain(metadata["tokenizer.ggml.model"]) == "gpt2"
    tok_dict = {name: plain(metadata[f"tokenizer.{key}"])
                for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
                if f"tokenizer.{key}" in metadata}
    reference, _ = convert_gguf_tokenizer("llama", tok_dict)
    ours = load_gguf_tokenizer(SMOLLM2, metadata)
    assert ours.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    for text in TEXTS:
        ids = reference.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
