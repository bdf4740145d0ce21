"""Fuzzing: config parsing, GGUF files and their metadata, chat message lists and sampling
settings, fed anything. Nothing may raise but our documented errors (or crash the process)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import mistral_common
import mlx.core as mx
import pytest
from bad_files import write_llama_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx_mixtral
from mlx_mixtral import ChatFormatError, ConfigError, MlxMixtralError, ModelArgs
from mlx_mixtral.errors import SamplingError
from mlx_mixtral.generation.sampling import SETTINGS, SamplingParams
from mlx_mixtral.loading.gguf_file import config_from_metadata
from mlx_mixtral.loading.source import load_config
from mlx_mixtral.model.config import SUPPORTED_MODEL_TYPES
from mlx_mixtral.text.chat_format import FORMATS, apply_chat_template
from mlx_mixtral.text.tokenizer import SentencePieceTokenizer

FUZZ = settings(max_examples=500, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.integers(-3, 4096), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8)

VALID = dict(model_type="mixtral", vocab_size=128, hidden_size=64, intermediate_size=96,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
CONFIG_KEYS = [*VALID, "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
               "sliding_window", "tie_word_embeddings", "num_local_experts",
               "num_experts_per_tok", "rope_parameters", "quantization", "unknown_key"]


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, max_size=5),
       dropped=st.sets(st.sampled_from(list(VALID)), max_size=2))
def test_config_parsing(changes, dropped):
    config = {k: v for k, v in {**VALID, **changes}.items() if k not in dropped}
    try:
        args = ModelArgs.from_dict(config)
    except ConfigError:
        return
    # What parses is usable: positive sizes, heads that group, a known type.
    assert args.model_type in SUPPORTED_MODEL_TYPES
    assert args.num_attention_heads % args.num_key_value_heads == 0
    assert args.head_dim > 0 and args.rope_theta > 0 and args.rms_norm_eps > 0
    total, active = args.parameter_counts()
    assert 0 < active <= total


@FUZZ
@given(text=st.one_of(st.binary(max_size=200), json_values.map(
    lambda v: __import__("json").dumps(v).encode())))
def test_config_files(tmp_path, text):
    (tmp_path / "config.json").write_bytes(text)
    with contextlib.suppress(ConfigError):
        load_config(tmp_path)


LLAMA_KEYS = ["general.architecture", "llama.expert_count", "llama.expert_used_count",
              "llama.vocab_size", "llama.embedding_length", "llama.feed_forward_length",
              "llama.block_count", "llama.attention.head_count",
              "llama.attention.head_count_kv", "llama.attention.key_length",
              "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base",
              "llama.context_length", "tokenizer.ggml.tokens"]
GOOD_METADATA = {"general.architecture": "llama", "llama.vocab_size": 128,
                 "llama.embedding_length": 64, "llama.feed_forward_length": 96,
                 "llama.block_count": 2, "llama.attention.head_count": 4,
                 "llama.attention.head_count_kv": 2}
meta_values = st.one_of(json_values, st.integers(-5, 70).map(mx.array),
                        st.floats(-1e6, 1e6).map(mx.array),
                        st.lists(st.integers(0, 9), max_size=4).map(mx.array))


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(LLAMA_KEYS), meta_values, max_size=5),
       dropped=st.sets(st.sampled_from(list(GOOD_METADATA)), max_size=2))
def test_gguf_metadata(changes, dropped):
    metadata = {k: v for k, v in {**GOOD_METADATA, **changes}.items() if k not in dropped}
    with contextlib.suppress(ConfigError):
        ModelArgs.from_dict(config_from_metadata(metadata, Path("fuzz.gguf")))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> TinyGGUF:
    import gguf

    path = write_llama_gguf(tmp_path_factory.mktemp("fuzz") / "tiny.gguf")
    return TinyGGUF(path.read_bytes(), gguf.GGUFReader(str(path)).data_offset)


class TinyGGUF:
    """The bytes of a tiny GGUF, and where its tensor data starts (a short repr for
    hypothesis' reports)."""

    def __init__(self, data: bytes, header_end: int) -> None:
        self.data, self.header_end = data, header_end

    def __repr__(self) -> str:
        return f"TinyGGUF({len(self.data)} bytes, header {self.header_end})"


@FUZZ
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.binary(min_size=1,
                                                                              max_size=8)),
                      min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_gguf_files(tmp_path, tiny_gguf, edits, cut):
    """Damaged headers (counts, lengths, types, shapes, offsets, metadata values) or a cut
    file: loading model and vocabulary raises our errors or works, never crashes."""
    data, header_end = tiny_gguf.data, tiny_gguf.header_end
    raw = bytearray(data)
    for where, patch in edits:
        at = int(where * header_end)
        raw[at:at + len(patch)] = patch
    if cut is not None:
        raw = raw[: int(cut * len(raw))]
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(raw))
    try:
        model, tokenizer = mlx_mixtral.load(path)
        mx.eval(model(mx.array([[1, 2, 3]])))
    except MlxMixtralError:
        pass


V1 = SentencePieceTokenizer(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                           "content": st.text(max_size=20)}),
    st.dictionaries(st.sampled_from(["role", "content", "name"]), json_values, max_size=3),
    json_values)


@FUZZ
@given(messages=st.one_of(st.lists(message, max_size=6), json_values),
       fmt=st.sampled_from([*FORMATS, None, "chatml"]))
def test_chat_message_lists(messages, fmt):
    try:
        ids = apply_chat_template(V1, messages, chat_format=fmt)
    except ChatFormatError:
        return
    assert ids and all(0 <= i < V1.vocab_size for i in ids)


SAMPLING_FIELDS = [s.name for s in SETTINGS] + ["unknown"]  # a new setting is fuzzed too
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 200),
                    st.floats(0, 1), scalars)


@FUZZ
@given(settings_=st.dictionaries(st.sampled_from(SAMPLING_FIELDS), numbers, max_size=5),
       seed=st.integers(0, 2**16))
def test_sampling_params(settings_, seed):
    try:
        params = SamplingParams.from_kwargs(**settings_)
    except SamplingError:
        return
    assert params.temperature >= 0 and 0 <= params.top_p <= 1 and params.max_tokens >= 1
    assert not math.isnan(params.temperature)
    mx.random.seed(seed)
    logits = mx.random.normal((1, 64))
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    for process in params.logits_processors():
        logprobs = process(mx.array([3, 4, 5]), logprobs)
    token = params.sampler(64)(logprobs).item()
    assert 0 <= token < 64
