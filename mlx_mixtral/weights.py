"""Loading weights from a model folder: Hugging Face safetensors or an MLX (mlx-lm) folder.

Loading is lazy: `mx.load` maps safetensors without reading them, and the stacking of
per-expert tensors stays a lazy graph, so only one copy of the weights is ever materialised.
Pickled weights (`.bin`, `.pt`, `.pth`) are never opened: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .config import ModelArgs, load_config
from .errors import WeightsError
from .model import Model

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_EXPERT_NAMES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT_KEY = re.compile(r"^(.*\.block_sparse_moe)\.experts\.(\d+)\.(w[123])\.(\w+)$")


def check_safetensors(path: Path) -> dict:
    """The header of a sound safetensors file; refuse one whose header lies (MLX would only
    fail later, with a message about its internals)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated safetensors file (no header); download it again")
        header_len = int.from_bytes(head, "little")
        if header_len <= 0 or 8 + header_len > size:
            raise WeightsError(f"{path}: truncated or corrupt safetensors file (header length "
                               f"{header_len} in a {size}-byte file); download it again")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise WeightsError(f"{path}: corrupt safetensors header (not JSON); download it "
                               "again") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header; download it again")
    data_size = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise WeightsError(f"{path}: tensor {name!r} lies past the end of the file "
                               "(truncated download?); download it again")
    return header


def load_safetensors(folder: Path) -> dict[str, mx.array]:
    """All tensors of a folder's `*.safetensors` files, lazily."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise WeightsError(
                f"{folder}: only pickled weights ({', '.join(pickles[:3])}); they are refused "
                "because unpickling can run code. Get the safetensors version of the model "
                "(most Hugging Face repos have one) or convert it with transformers' "
                "save_pretrained(..., safe_serialization=True) on a trusted machine."
            )
        raise WeightsError(f"{folder}: no *.safetensors weight files")
    weights: dict[str, mx.array] = {}
    for path in files:
        check_safetensors(path)
        try:
            weights.update(mx.load(str(path)))
        except Exception as e:  # mx.load raises RuntimeError/ValueError on corrupt files
            raise WeightsError(f"{path}: cannot read safetensors ({e}); download it "
                               "again") from None
    return weights


def stack_experts(weights: dict[str, mx.array], num_experts: int) -> dict[str, mx.array]:
    """Hugging Face `experts.E.w1/w2/w3` -> stacked `switch_mlp.{gate,down,up}_proj`."""
    groups: dict[str, dict[int, mx.array]] = {}
    out = {}
    for key, value in weights.items():
        m = _EXPERT_KEY.match(key)
        if m is None:
            out[key] = value
            continue
        prefix, expert, name, param = m.groups()
        target = f"{prefix}.switch_mlp.{_EXPERT_NAMES[name]}.{param}"
        groups.setdefault(target, {})[int(expert)] = value
    for target, experts in groups.items():
        if sorted(experts) != list(range(num_experts)):
            raise WeightsError(
                f"{target}: expected experts 0..{num_experts - 1}, found {sorted(experts)}"
            )
        out[target] = mx.stack([experts[e] for e in range(num_experts)])
    return out


def sanitize(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """Map a checkpoint's tensors onto our parameter names."""
    weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    if args.is_moe:
        weights = stack_experts(weights, args.num_local_experts)
    return weights


def _quantization_predicate(quantization: dict, weights: dict[str, mx.array]):
    """Quantize exactly the layers the checkpoint stores quantized (mlx-lm's config format:
    defaults at the top level, per-layer overrides keyed by module path)."""

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights:
            return False
        if isinstance(quantization.get(path), dict):
            return quantization[path]
        return True

    return predicate


def upcast_for_cpu(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """On the CPU backend, half-precision weights and scales make quantized matmuls 8-30x
    slower and `gather_mm` accepts only float32: keep every float tensor in float32 there."""
    if mx.default_device() != mx.cpu:
        return weights
    half = (mx.float16, mx.bfloat16)
    return {k: v.astype(mx.float32) if v.dtype in half else v for k, v in weights.items()}


def check_shapes(args: ModelArgs, weights: dict[str, mx.array], source: str) -> None:
    """The config's layer count, width and vocabulary against the tensors, before building a
    model of the config's size (a lying config could otherwise ask for a huge one)."""
    layers = {int(m.group(1)) for k in weights if (m := _LAYER_KEY.match(k))}
    if layers != set(range(args.num_hidden_layers)):
        raise WeightsError(f"{source}: the config says {args.num_hidden_layers} layers but the "
                           f"weights hold {len(layers)}; the config and weights do not belong "
                           "together")
    for name, dim, want in (("model.norm.weight", -1, args.hidden_size),
                            ("model.embed_tokens.weight", 0, args.vocab_size)):
        if name not in weights:
            raise WeightsError(f"{source}: the weights lack {name}")
        if weights[name].ndim < 1 or weights[name].shape[dim] != want:
            raise WeightsError(f"{source}: {name} has the shape {tuple(weights[name].shape)}, "
                               f"which disagrees with the config ({want}); the config and "
                               "weights do not belong together")


def build_model(args: ModelArgs, weights: dict[str, mx.array], quantization: dict | None,
                source: str) -> Model:
    """A `Model` holding `weights` (already in our names), quantized where they are."""
    check_shapes(args, weights, source)
    model = Model(args)
    if isinstance(quantization, dict) and "bits" in quantization:
        nn.quantize(
            model,
            group_size=quantization.get("group_size", 64),
            bits=quantization["bits"],
            mode=quantization.get("mode", "affine"),
            class_predicate=_quantization_predicate(quantization, weights),
        )
    try:
        model.load_weights(list(upcast_for_cpu(weights).items()), strict=True)
    except ValueError as e:
        raise WeightsError(f"{source}: weights do not match the config ({e}); the config and "
                           "weights do not belong together") from None
    return model.fuse()


def load_model(folder: str | Path, lazy: bool = True) -> Model:
    """Build a `Model` from a folder with `config.json` and safetensors weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a folder")
    args, config = load_config(folder)
    weights = sanitize(load_safetensors(folder), args)
    model = build_model(args, weights, config.get("quantization"), str(folder))
    if not lazy:
        mx.eval(model.parameters())
    return model
