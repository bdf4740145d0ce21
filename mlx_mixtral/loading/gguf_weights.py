"""Loading llama-architecture GGUF files (Mistral, Mixtral, and other llama models).

`mx.load` reads GGUF natively and keeps F32/F16/Q4_0/Q4_1/Q8_0 tensors as they are (the
quantized ones as MLX affine weights with group size 32). Files with types it cannot read
(K-quants, I-quants ...) are read tensor by tensor with the `gguf` package: their Q4_0/Q4_1/
Q8_0 tensors still kept as they are (gguf_quants.py, the same conversion), the others
dequantized and re-quantized in MLX; a type neither can read is refused by name. The same
reading, without the experts, builds a model whose experts stream (gguf_experts.py).

llama.cpp's converter permutes the rows of q/k for interleaved (GPT-J) RoPE; we undo that, so a
GGUF model runs the same Hugging Face layout as every other format.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from ..errors import WeightsError
from ..model.config import ModelArgs
from ..model.decoder import Model
from .checkpoint import build_model, stack_experts
from .gguf_file import GGUF_GROUP_SIZE, mlx_bits, unreadable
from .gguf_quants import NATIVE_BITS, affine_tensor

if TYPE_CHECKING:
    from .source import ModelSource

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
# An expert tensor, stacked (blk.N.ffn_gate_exps.weight) or one per expert (blk.N.ffn_gate.E.weight)
EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)(?:_exps|\.(\d+))\.weight$")
_BLOCK_KEY = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|scales|biases)$")
_SKIP = ("rope_freqs", "attn_rot_embd")


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


def _read_with_gguf_package(path: Path, keep: Callable[[str], bool] | None = None
                            ) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Read a GGUF whose tensor types MLX cannot load (or only the tensors `keep` names):
    Q4_0, Q4_1 and Q8_0 tensors are converted as `mx.load` converts them (gguf_quants.py),
    the others dequantized by the `gguf` package and re-quantized in MLX (group 32, enough
    bits to hold the type), so memory stays near the file's size instead of growing to
    float16."""
    import gguf  # only needed for these files

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise WeightsError(f"{path}: cannot read GGUF ({e})") from None
    tensors: dict[str, mx.array] = {}
    for t in reader.tensors:
        if keep is None or keep(t.name):
            tensors.update(_tensor_arrays(t, path))
    metadata: dict[str, Any] = {}
    for name, field in reader.fields.items():
        try:
            value = field.contents()
        except (ValueError, IndexError):  # UnicodeDecodeError is a ValueError
            raise WeightsError(f"{path}: GGUF metadata {name!r} is unreadable (corrupt file?); "
                               "download it again") from None
        metadata[name] = mx.array(value) if isinstance(value, (int, float, bool)) else value
    return tensors, metadata


def _tensor_arrays(t: Any, path: Path) -> dict[str, mx.array]:
    """One tensor of a `gguf.GGUFReader` as MLX arrays: with its scales and biases when it
    stays quantized."""
    import gguf

    shape = tuple(int(d) for d in reversed(t.shape))
    stem = t.name.rpartition(".")[0]
    kind = t.tensor_type.name
    if kind in NATIVE_BITS:
        weight, scales, biases = affine_tensor(t.data, kind, shape)
        return {t.name: mx.array(weight), f"{stem}.scales": mx.array(scales),
                f"{stem}.biases": mx.array(biases)}
    if kind in ("F32", "F16"):  # kept in their own dtype, as mx.load keeps them
        return {t.name: mx.array(np.asarray(t.data).reshape(shape))}
    try:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise unreadable(path, t.name, kind) from None
    value = mx.array(np.asarray(data, dtype=np.float32).reshape(shape))
    if kind == "BF16" or value.ndim < 2 or shape[-1] % GGUF_GROUP_SIZE:
        return {t.name: value}
    q, scales, biases = mx.quantize(value, GGUF_GROUP_SIZE, mlx_bits(t.tensor_type))
    mx.eval(q, scales, biases)
    return {t.name: q, f"{stem}.scales": scales, f"{stem}.biases": biases}


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


def our_module(name: str) -> str:
    """Our module for a GGUF tensor ("blk.3.ffn_down.5.weight" ->
    "model.layers.3.block_sparse_moe.switch_mlp.down_proj"): what says how to quantize it."""
    stem = name.rpartition(".")[0]
    if stem in _TOP_LEVEL:
        return _TOP_LEVEL[stem]
    if (m := _PER_EXPERT.match(name)) is not None:
        return f"model.layers.{m.group(1)}.block_sparse_moe.switch_mlp.{m.group(2)}_proj"
    if (m := _BLOCK_KEY.match(name)) is not None and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}"
    return stem


def gguf_weights(source: ModelSource, tensors: dict[str, mx.array] | None = None
                 ) -> tuple[dict[str, mx.array], dict[str, Any] | None, dict[str, Any]]:
    """A described GGUF file's tensors under our names (`tensors`: already read, under the
    file's names), their quantization config, and the file's metadata (MLX's reading of it,
    vocabulary arrays included; {} when `tensors` were given)."""
    path = source.path
    metadata: dict[str, Any] = {}
    if tensors is None:
        tensors, metadata = _read_tensors(path)
    try:
        weights = _rename(tensors, source.args, path)
        return weights, _quantization(weights), metadata
    except (ValueError, KeyError, ZeroDivisionError) as e:  # shapes that contradict metadata
        raise WeightsError(f"{path}: tensor shapes disagree with the metadata ({e})") from None


def load_gguf(source: ModelSource, dtype: str | mx.Dtype | None = None, fuse: bool = True
              ) -> tuple[Model, dict[str, Any]]:
    """Build a `Model` from a described GGUF file; returns it with the file's metadata (MLX's
    reading of it, vocabulary arrays included)."""
    weights, quantization, metadata = gguf_weights(source)
    return build_model(source.args, weights, quantization, str(source.path), dtype,
                       fuse), metadata


def is_gguf_expert(name: str) -> bool:
    return EXPERT_TENSOR.match(name) is not None


def expert_module(layer: int, proj: str) -> str:
    """Our module holding the `proj` ("gate", "up", "down") experts of `layer`."""
    return f"model.layers.{layer}.{_BLOCK[f'ffn_{proj}_exps']}"


def load_gguf_without_experts(source: ModelSource, slots: int,
                              dtype: str | mx.Dtype | None = None) -> Model:
    """The model of a GGUF Mixtral with every weight but the experts, read as `load_gguf`
    reads them, and `slots` empty expert slots per layer quantized as the file's experts are
    (their types: Q4_0, Q4_1 or Q8_0, which gguf_experts.py checked)."""
    from .gguf_quants import GROUP

    path, args = source.path, source.args
    tensors, _ = _read_with_gguf_package(path, keep=lambda name: not is_gguf_expert(name))
    try:
        weights = _rename(tensors, args, path)
    except (ValueError, KeyError) as e:
        raise WeightsError(f"{path}: tensor shapes disagree with the metadata ({e})") from None
    del tensors
    quantization = _quantization(weights) or {"group_size": GROUP, "bits": 4}
    stored = set()
    for t in source.tensors:
        if (m := EXPERT_TENSOR.match(t.name)) is not None:
            module = expert_module(int(m.group(1)), m.group(2))
            quantization[module] = {"group_size": GROUP, "bits": NATIVE_BITS[t.dtype]}
            stored.update(f"{module}.{p}" for p in ("weight", "scales", "biases"))
    return build_model(args, weights, quantization, str(path), dtype, slots=slots,
                       stored=stored)
