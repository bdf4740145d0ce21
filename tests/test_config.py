"""ModelArgs from Hugging Face configs, and the presets' sizes."""

from __future__ import annotations

import json

import pytest

from mlx_mixtral import PRESETS, ConfigError, ModelArgs, preset
from mlx_mixtral.loading.source import load_config

TINY = dict(model_type="mistral", vocab_size=10, hidden_size=8, intermediate_size=16,
            num_hidden_layers=1, num_attention_heads=2)


def test_rope_theta_top_level_or_rope_parameters():
    assert ModelArgs.from_dict({**TINY, "rope_theta": 5.0}).rope_theta == 5.0
    nested = {**TINY, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}
    assert ModelArgs.from_dict(nested).rope_theta == 7.0


def test_head_dim_explicit_derived_or_null():
    assert ModelArgs.from_dict(TINY).head_dim == 4
    assert ModelArgs.from_dict({**TINY, "head_dim": None}).head_dim == 4
    assert ModelArgs.from_dict({**TINY, "head_dim": 16}).head_dim == 16


def test_defaults_and_optional_fields():
    args = ModelArgs.from_dict({**TINY, "sliding_window": None, "tie_word_embeddings": True})
    assert args.sliding_window is None and args.tie_word_embeddings
    assert args.num_key_value_heads == 2
    assert ModelArgs.from_dict({**TINY, "sliding_window": 4096}).sliding_window == 4096
    moe = ModelArgs.from_dict({**TINY, "model_type": "mixtral", "num_local_experts": 64,
                               "num_experts_per_tok": 6})
    assert moe.is_moe and (moe.num_local_experts, moe.num_experts_per_tok) == (64, 6)


def test_unknown_keys_ignored():
    args = ModelArgs.from_dict({**TINY, "architectures": ["X"], "torch_dtype": "bfloat16",
                                "something_new": {"a": 1}})
    assert args.hidden_size == 8


def test_missing_keys_named():
    broken = {k: v for k, v in TINY.items() if k not in ("hidden_size", "vocab_size")}
    with pytest.raises(ConfigError, match="vocab_size, hidden_size"):
        ModelArgs.from_dict(broken)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama4"}, "unsupported model_type 'llama4'"),
        ({"hidden_size": "8"}, "hidden_size must be a positive integer"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"model_type": "mixtral", "num_experts_per_tok": 9}, "num_experts_per_tok"),
    ],
)
def test_bad_values(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelArgs.from_dict({**TINY, **change})


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ConfigError, match=r"config.json: config is missing required key"):
        load_config(tmp_path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)


# Published sizes: Mistral 7B 7.24B; Mixtral 8x7B 46.7B total / 12.9B active;
# Mixtral 8x22B 141B / 39B.
@pytest.mark.parametrize(
    "name, total, active",
    [
        ("mistral-7b-v0.1", 7.24e9, 7.24e9),
        ("mistral-7b-v0.2", 7.24e9, 7.24e9),
        ("mistral-7b-v0.3", 7.24e9, 7.24e9),
        ("mixtral-8x7b", 46.7e9, 12.9e9),
        ("mixtral-8x22b", 141e9, 39e9),
    ],
)
def test_preset_parameter_counts(name, total, active):
    got_total, got_active = preset(name).parameter_counts()
    assert abs(got_total - total) / total <= 0.01
    assert abs(got_active - active) / active <= 0.01


def test_presets_listed_and_unknown_refused():
    assert {"mixtral-8x7b", "mixtral-8x22b", "mistral-7b-v0.1"} <= set(PRESETS)
    assert preset("mistral-7b-v0.1").sliding_window == 4096
    assert preset("mistral-7b-v0.2").sliding_window is None
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("gpt-5")
