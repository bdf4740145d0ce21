"""Loading llama-architecture GGUF files (Mistral, Mixtral, and other llama models).

`mx.load` reads GGUF natively and keeps F32/F16/Q4_0/Q4_1/Q8_0 tensors as they are (the
quantized ones as MLX affine weights with group size 32). Files with types it cannot read
(K-quants, I-quants ...) are dequantized tensor by tensor with the `gguf` package and
re-quantized in MLX; a type neither can read is refused by name.

llama.cpp's converter permutes the rows of q/k for interleaved (GPT-J) RoPE; we undo that, so a
GGUF model runs the same Hugging Face layout as every other format.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from ..errors import ConfigError, WeightsError
from ..model.config import ModelArgs
from ..model.decoder import Model
from .checkpoint import build_model, stack_experts

if TYPE_CHECKING:
    from .source import ModelSource

GGUF_GROUP_SIZE = 32

_TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "block_sparse_moe.gate",
    "ffn_gate_exps": "block_sparse_moe.switch_mlp.gate_proj",
    "ffn_up_exps": "block_sparse_moe.switch_mlp.up_proj",
    "ffn_down_exps": "block_sparse_moe.switch_mlp.down_proj",
}
# Older Mixtral GGUFs store one tensor per expert: blk.N.ffn_gate.E.weight
_PER_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.(weight|scales|biases)$")
_BLOCK_KEY = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|scales|biases)$")
_SKIP = ("rope_freqs", "attn_rot_embd")


def _meta(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    value = metadata.get(key, default)
    if isinstance(value, mx.array):
        value = value.item() if value.size == 1 else value.tolist()
    return value


def _count(value: Any) -> int:
    """A metadata count as an int (0 when absent); anything else is refused by ModelArgs."""
    if value is None:
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def config_from_metadata(metadata: dict[str, Any], path: Path) -> dict[str, Any]:
    """A Hugging Face style config dict from GGUF metadata."""
    arch = _meta(metadata, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported "
                          "(only 'llama': Mistral, Mixtral and other llama models)")

    def key(name: str, default: Any = None) -> Any:
        return _meta(metadata, f"llama.{name}", default)

    tokens = metadata.get("tokenizer.ggml.tokens")
    experts = _count(key("expert_count"))
    config = {
        "model_type": "mixtral" if experts > 1 else "mistral",
        # (the header walk gives the token list as its length; MLX's reader as the list)
        "vocab_size": key("vocab_size") or (len(tokens) if isinstance(tokens, list) else tokens
                                            if isinstance(tokens, int) else None),
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": key("attention.head_count"),
        "num_key_value_heads": key("attention.head_count_kv"),
        "head_dim": key("attention.key_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": key("rope.freq_base", 10000.0),
        "max_position_embeddings": key("context_length", 4096),
    }
    if experts > 1:
        config["num_local_experts"] = experts
        config["num_experts_per_tok"] = key("expert_used_count", 2)
    missing = [k for k, v in config.items() if v is None and k != "head_dim"]
    if missing:
        raise ConfigError(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    if experts < 0:
        raise ConfigError(f"{path}: GGUF metadata llama.expert_count is not a count")
    return config


def _unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Invert llama.cpp's q/k row permutation (interleaved RoPE -> rotate-half layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _read_tensors(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    try:
        return mx.load(str(path), format="gguf", return_metadata=True)
    except (RuntimeError, ValueError):
        pass  # a tensor type MLX cannot read (K-quants, I-quants, Q5_x ...), or a bad file
    return _read_with_gguf_package(path)


def mlx_bits(qtype: Any) -> int:
    """The MLX affine width that holds a GGUF type without losing precision to it."""
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    per_weight = math.ceil(size * 8 / block)
    return next(b for b in (2, 3, 4, 5, 6, 8) if b >= min(per_weight, 8))


def unreadable(path: Path, tensor: str, type_name: str) -> WeightsError:
    return WeightsError(
        f"{path}: tensor {tensor} has type {type_name}, which neither MLX nor the gguf package "
        "can read; use a file with another quantization (Q4_K_M, Q8_0, F16 ...)")


def check_readable(path: Path, tensors: list[tuple[str, str]]) -> None:
    """Refuse, by name, a (tensor, GGML type) that neither MLX nor the gguf package reads."""
    import gguf.quants

    readable = {"F32", "F16", *(t.name for t in getattr(gguf.quants, "_type_traits", {}))}
    for name, kind in tensors:
        if kind not in readable:
            raise unreadable(path, name, kind)


def _read_with_gguf_package(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Read a GGUF whose tensor types MLX cannot load: the `gguf` package dequantizes each
    tensor, which is then re-quantized in MLX (group 32, enough bits to hold the type), so
    memory stays near the file's size instead of growing to float16."""
    import gguf  # only needed for these files

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise WeightsError(f"{path}: cannot read GGUF ({e})") from None
    float_types = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                   gguf.GGMLQuantizationType.BF16)
    tensors: dict[str, mx.array] = {}
    for t in reader.tensors:
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise unreadable(path, t.name, t.tensor_type.name) from None
        shape = tuple(int(d) for d in reversed(t.shape))
        value = mx.array(np.asarray(data, dtype=np.float32).reshape(shape))
        stem = t.name.rpartition(".")[0]
        if t.tensor_type in float_types or value.ndim < 2 or shape[-1] % GGUF_GROUP_SIZE:
            tensors[t.name] = value
            continue
        q, scales, biases = mx.quantize(value, GGUF_GROUP_SIZE, mlx_bits(t.tensor_type))
        mx.eval(q, scales, biases)
        tensors.update({t.name: q, f"{stem}.scales": scales, f"{stem}.biases": biases})
    metadata: dict[str, Any] = {}
    for name, field in reader.fields.items():
        try:
            value = field.contents()
        except (ValueError, IndexError):  # UnicodeDecodeError is a ValueError
            raise WeightsError(f"{path}: GGUF metadata {name!r} is unreadable (corrupt file?); "
                               "download it again") from None
        metadata[name] = mx.array(value) if isinstance(value, (int, float, bool)) else value
    return tensors, metadata


def _rename(tensors: dict[str, mx.array], args: ModelArgs, path: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    per_expert: dict[str, dict[int, mx.array]] = {}
    for name, value in tensors.items():
        stem, _, param = name.rpartition(".")
        if stem in _TOP_LEVEL:
            weights[f"{_TOP_LEVEL[stem]}.{param}"] = value
            continue
        if (m := _PER_EXPERT.match(name)) is not None:
            layer, proj, expert, param = m.groups()
            target = (f"model.layers.{layer}.block_sparse_moe.switch_mlp.{proj}_proj.{param}")
            per_expert.setdefault(target, {})[int(expert)] = value
            continue
        m = _BLOCK_KEY.match(name)
        if m is None or m.group(2) not in _BLOCK:
            if any(s in name for s in _SKIP):
                continue
            raise WeightsError(f"{path}: unexpected tensor {name!r} in a llama GGUF")
        layer, kind, param = m.groups()
        if kind == "attn_q":
            value = _unpermute_rows(value, args.num_attention_heads)
        elif kind == "attn_k":
            value = _unpermute_rows(value, args.num_key_value_heads)
        weights[f"model.layers.{layer}.{_BLOCK[kind]}.{param}"] = value
    return {**weights, **stack_experts(per_expert, args.num_local_experts)}


def _quantization(weights: dict[str, mx.array]) -> dict[str, Any] | None:
    """mlx-lm style per-layer quantization entries, read off the tensor shapes."""
    layers: dict[str, Any] = {}
    for name, scales in weights.items():
        if not name.endswith(".scales"):
            continue
        module = name[: -len(".scales")]
        in_dims = scales.shape[-1] * GGUF_GROUP_SIZE
        bits = weights[f"{module}.weight"].shape[-1] * 32 // in_dims
        layers[module] = {"group_size": GGUF_GROUP_SIZE, "bits": bits}
    if not layers:
        return None
    return {"group_size": GGUF_GROUP_SIZE, "bits": 4, **layers}


def load_gguf(source: ModelSource, dtype: str | mx.Dtype | None = None, fuse: bool = True
              ) -> tuple[Model, dict[str, Any]]:
    """Build a `Model` from a described GGUF file; returns it with the file's metadata (MLX's
    reading of it, vocabulary arrays included)."""
    path = source.path
    args = source.args
    tensors, metadata = _read_tensors(path)
    try:
        weights = _rename(tensors, args, path)
        quantization = _quantization(weights)
    except (ValueError, KeyError, ZeroDivisionError) as e:  # shapes that contradict metadata
        raise WeightsError(f"{path}: tensor shapes disagree with the metadata ({e})") from None
    return build_model(args, weights, quantization, str(path), dtype, fuse), metadata
