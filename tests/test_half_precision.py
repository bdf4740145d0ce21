"""The Mac's path on this CPU: bfloat16 and float16 weights and activations, float16 scales.

Each model runs in the half dtype with no upcast, against transformers in float32 on the same
weights. The bar comes from transformers itself: the same model in the same half dtype, against
its own float32 run. Ours may be at most 2x its error.
"""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import build_hf, hf_logits

from mlx_mixtral import load_model
from mlx_mixtral.convert import convert

WINDOW = 8
DTYPES = {"bfloat16": (mx.bfloat16, torch.bfloat16), "float16": (mx.float16, torch.float16)}
CASES = {
    "mistral-window": ("mistral", dict(sliding_window=WINDOW)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
}


def error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max())


def ours_logits(model, ids: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    """Prefill past the window, then decode token by token through the cache."""
    cache = model.make_cache()
    split = 3 * WINDOW
    parts = [model(mx.array(ids[:, :split]), cache=cache)]
    parts += [model(mx.array(ids[:, i:i + 1]), cache=cache) for i in range(split, ids.shape[1])]
    assert all(p.dtype == dtype for p in parts)  # the logits come out in the asked dtype
    return np.concatenate([np.array(p.astype(mx.float32)) for p in parts], axis=1)


def transformers_bar(ref, ids: np.ndarray, torch_dtype) -> tuple[np.ndarray, float]:
    """transformers' float32 logits, and its own error in the half dtype."""
    want = hf_logits(ref, ids)
    half = copy.deepcopy(ref).to(torch_dtype)
    bar = error(hf_logits(half, ids), want)
    assert bar > 0
    return want, bar


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_half_precision_matches_transformers(tmp_path, tokens, case, dtype):
    model_type, overrides = CASES[case]
    ref = build_hf(tmp_path, model_type, **overrides)
    mx_dtype, torch_dtype = DTYPES[dtype]
    model = load_model(tmp_path, dtype=dtype)
    for name, p in _float_parameters(model):
        expected = mx.float32 if ".switch_mlp." in name else mx_dtype  # CPU gather_mm
        assert p.dtype == expected, name
    ids = tokens(2, 4 * WINDOW)
    want, bar = transformers_bar(ref, ids, torch_dtype)
    assert error(ours_logits(model, ids, mx_dtype), want) <= 2 * bar


def _float_parameters(model):
    from mlx.utils import tree_flatten

    return [(n, p) for n, p in tree_flatten(model.parameters())
            if mx.issubdtype(p.dtype, mx.floating)]


def _dequantized_state(folder) -> dict[str, np.ndarray]:
    """The converted folder's weights, dequantized to float32, in transformers' names."""
    import json

    quant = json.loads((folder / "config.json").read_text())["quantization"]
    raw = {}
    for path in folder.glob("*.safetensors"):
        raw.update(mx.load(str(path)))
    out = {}
    for name, value in raw.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name.rpartition(".")[0]
        if f"{module}.scales" in raw:
            spec = quant.get(module) if isinstance(quant.get(module), dict) else quant
            value = mx.dequantize(value, raw[f"{module}.scales"], raw[f"{module}.biases"],
                                  spec["group_size"], spec["bits"])
        out[name] = np.array(value.astype(mx.float32))
    state = {}
    for name, value in out.items():
        if ".switch_mlp." in name:
            continue
        state[name.replace("block_sparse_moe.gate", "mlp.gate")] = value
    for layer in range(len({k.split(".")[2] for k in out if k.startswith("model.layers.")})):
        p = f"model.layers.{layer}.block_sparse_moe.switch_mlp."
        state[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = np.concatenate(
            [out[p + "gate_proj.weight"], out[p + "up_proj.weight"]], axis=1)
        state[f"model.layers.{layer}.mlp.experts.down_proj"] = out[p + "down_proj.weight"]
    return state


def test_quantized_float16_scales_match_transformers(tmp_path, tokens):
    """4-bit layers with float16 scales and activations (gather_qmm for the experts)."""
    ref = build_hf(tmp_path / "hf", "mixtral", num_local_experts=4, num_experts_per_tok=2,
                   sliding_window=WINDOW)
    out = tmp_path / "q4"
    convert(tmp_path / "hf", out, quantize=True, q_bits=4, q_group_size=32, dtype="float16",
            progress=False)
    model = load_model(out, dtype="float16")
    qkv = model.layers[0].self_attn.qkv_proj
    assert qkv.bits == 4 and qkv.scales.dtype == mx.float16
    assert model.layers[0].block_sparse_moe.switch_mlp.down_proj.scales.dtype == mx.float16
    state = {k: torch.from_numpy(v) for k, v in _dequantized_state(out).items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    ids = tokens(2, 4 * WINDOW)
    want, bar = transformers_bar(ref, ids, torch.float16)
    assert error(ours_logits(model, ids, mx.float16), want) <= 2 * bar
