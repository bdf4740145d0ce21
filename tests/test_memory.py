"""The load-size estimate behind the memory check, against what loading really allocates."""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_mixtral import ModelArgs, load
from mlx_mixtral.convert.synthetic import write_hf_checkpoint
from mlx_mixtral.demo import demo_model_path
from mlx_mixtral.loading import describe
from mlx_mixtral.loading.memory import available_memory, load_bytes


def parameter_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def test_estimate_of_a_half_precision_folder(tmp_path):
    args = ModelArgs.from_dict(dict(
        model_type="mixtral", vocab_size=256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4))
    write_hf_checkpoint(tmp_path, args, dtype=mx.float16)
    model, _ = load(tmp_path, tokenizer=False)
    assert load_bytes(describe(tmp_path)) == parameter_bytes(model)  # float32 on the CPU backend


def test_estimate_of_a_quantized_gguf():
    path = demo_model_path()
    model, _ = load(path, tokenizer=False)
    estimate, actual = load_bytes(describe(path)), parameter_bytes(model)
    assert abs(estimate - actual) <= 0.05 * actual, (estimate, actual)
    assert load_bytes(describe(str(path))) == estimate  # a path given as text too


def test_available_memory_is_plausible():
    assert 0 < available_memory() < 2**50
