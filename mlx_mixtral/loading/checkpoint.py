"""From a checkpoint's tensors to a `Model`: our names, stacked experts, shape checks,
quantized layers, the backend's dtypes; or, for expert paging, the same model with empty
expert slots.

Everything stays lazy: `mx.load` maps the files without reading them, and stacking experts and
casting are lazy graphs, so only one copy of the weights is ever materialised.
"""

from __future__ import annotations

import re
from collections.abc import Collection

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import WeightsError
from ..model.config import ModelArgs
from ..model.decoder import Model
from ..model.moe import ExpertsGLU
from ..model.precision import cast_weights

_EXPERT_NAMES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT_KEY = re.compile(r"^(.*\.block_sparse_moe)\.experts\.(\d+)\.(w[123])\.(\w+)$")
_EXPERT_MODULE = re.compile(r"^(.*\.block_sparse_moe)\.experts\.\d+\.(w[123])$")


def layer_index(key: str) -> int | None:
    """The decoder layer a checkpoint's tensor belongs to (None: embeddings, head, final norm)."""
    m = _LAYER_KEY.match(key)
    return int(m.group(1)) if m else None


def hf_expert(key: str) -> int | None:
    """The expert a Hugging Face `experts.E.w1...` tensor holds (None for other tensors): its
    row of the stacked tensor named `tensor_name(key)`."""
    m = _EXPERT_KEY.match(key)
    return int(m.group(2)) if m else None


def module_name(layer: str) -> str:
    """Our module for a checkpoint's layer: Hugging Face's `experts.E.w1` is one row of the
    stacked `switch_mlp.gate_proj` (as `_stack_hf_experts` stacks it)."""
    m = _EXPERT_MODULE.match(layer)
    return f"{m.group(1)}.switch_mlp.{_EXPERT_NAMES[m.group(2)]}" if m else layer


def tensor_name(key: str) -> str:
    """Our name for a checkpoint's tensor ("...experts.3.w1.scales" ->
    "...switch_mlp.gate_proj.scales"): what says which of our layers it quantizes."""
    module, _, param = key.rpartition(".")
    return f"{module_name(module)}.{param}"


def per_expert_name(stacked: str, expert: int) -> str:
    """Hugging Face's name of one expert's row of a stacked tensor (the inverse of
    `tensor_name`): "...switch_mlp.gate_proj.scales", 3 -> "...experts.3.w1.scales"."""
    module, _, param = stacked.rpartition(".")
    prefix, _, proj = module.rpartition(".switch_mlp.")
    hf = next(k for k, v in _EXPERT_NAMES.items() if v == proj)
    return f"{prefix}.experts.{expert}.{hf}.{param}"


def stack_experts(groups: dict[str, dict[int, mx.array]],
                  num_experts: int) -> dict[str, mx.array]:
    """Per-expert tensors {target name: {expert: tensor}} stacked as `[experts, ...]`; every
    expert 0..num_experts-1 must be there."""
    out = {}
    for target, experts in groups.items():
        if sorted(experts) != list(range(num_experts)):
            raise WeightsError(
                f"{target}: expected experts 0..{num_experts - 1}, found {sorted(experts)}"
            )
        out[target] = mx.stack([experts[e] for e in range(num_experts)])
    return out


def _stack_hf_experts(weights: dict[str, mx.array], num_experts: int) -> dict[str, mx.array]:
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
    return {**out, **stack_experts(groups, num_experts)}


def sanitize(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """Map a checkpoint's tensors onto our parameter names."""
    weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    if args.is_moe:
        weights = _stack_hf_experts(weights, args.num_local_experts)
    return weights


def _quantization_predicate(quantization: dict, stored: Collection[str]):
    """Quantize exactly the layers the checkpoint stores quantized (`stored`: its tensor names,
    ours; mlx-lm's config format: defaults at the top level, per-layer overrides keyed by
    module path)."""

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in stored:
            return False
        if isinstance(quantization.get(path), dict):
            return quantization[path]
        return True

    return predicate


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
                source: str, dtype: str | mx.Dtype | None = None, fuse: bool = True,
                slots: int | None = None, stored: Collection[str] = ()) -> Model:
    """A `Model` holding `weights` (already in our names), quantized where they are, in the
    dtypes this backend computes in (`dtype` overrides; see model/precision.py).

    The expert-paging variant (`slots`): `weights` holds everything but the experts, and
    each MoE layer gets `slots` expert slots instead of all its experts, left for the caller to
    fill; `stored` names the experts' tensors, which say how they are quantized."""
    check_shapes(args, weights, source)
    model = model_skeleton(args, quantization, {*weights, *stored}, slots)
    load_checked(model, cast_weights(weights, dtype), source, slots is not None)
    return model.fuse() if fuse else model


def model_skeleton(args: ModelArgs, quantization: dict | None, stored: Collection[str],
                   slots: int | None = None) -> Model:
    """The model's modules, quantized as the tensors named `stored` (ours) are, with no weights
    loaded: their initial values are lazy and never computed, so this costs no memory. (`slots`:
    that many expert slots per MoE layer instead of every expert.)"""
    model = Model(args)
    if slots is not None:
        for layer in model.layers:
            layer.block_sparse_moe.switch_mlp = ExpertsGLU(args.hidden_size,
                                                            args.intermediate_size, slots)
    if isinstance(quantization, dict) and "bits" in quantization:
        nn.quantize(
            model,
            group_size=quantization.get("group_size", 64),
            bits=quantization["bits"],
            mode=quantization.get("mode", "affine"),
            class_predicate=_quantization_predicate(quantization, stored),
        )
    return model


def load_checked(model: Model, weights: dict[str, mx.array], source: str,
                 without_experts: bool) -> None:
    """Every parameter from `weights` (but the expert slots, when they are paged)."""
    if without_experts:
        expected = {k for k, _ in tree_flatten(model.parameters()) if ".switch_mlp." not in k}
        if expected != set(weights):
            odd = sorted(expected ^ set(weights))[:3]
            raise WeightsError(f"{source}: weights do not match the config ({', '.join(odd)}); "
                               "the config and weights do not belong together")
    try:
        model.load_weights(list(weights.items()), strict=not without_experts)
    except ValueError as e:
        raise WeightsError(f"{source}: weights do not match the config ({e}); the config and "
                           "weights do not belong together") from None
