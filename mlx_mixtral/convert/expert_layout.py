"""How a Mixtral's experts lie in a converted folder (`convert --layout`): stacked, or per expert.

The stacked layout (mlx-lm's) writes a layer's experts as nine `[experts, ...]` tensors
(gate/up/down x weight/scales/biases), so one expert is nine byte ranges spread over the layer.
Expert paging reads an expert each time the router picks one it does not hold; in the
per-expert layout each expert is written under Hugging Face's names
(`experts.E.w1/w3/w2.{weight,scales,biases}`: gate, up, down), its tensors one after another in
one shard: one expert, one byte range. Loaders stack
them back (ours, and mlx-lm's `sanitize`), so a loaded model is the same in either layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the parser reads LAYOUTS: importing this stays light
    import mlx.core as mx

LAYOUTS = ("stacked", "per-expert")
_PROJS = ("gate", "up", "down")  # w1, w3, w2: the order the expert runs them in
_PARAMS = ("weight", "scales", "biases")


def _layer_of(name: str) -> str | None:
    """The stacked experts' module prefix (`...block_sparse_moe.switch_mlp`) of a stacked
    expert tensor, else None."""
    from ..loading.expert_files import EXPERT_TENSOR

    m = EXPERT_TENSOR.match(name)
    if m is None or m.group(2) is None:
        return None
    return name.rpartition(f".{m.group(2)}_proj.")[0]


def _per_expert(prefix: str, stacked: dict[str, mx.array],
                num_experts: int) -> list[dict[str, mx.array]]:
    """One layer's stacked tensors as one group per expert (lazy rows, in file order)."""
    from ..loading.checkpoint import per_expert_name

    groups = []
    for e in range(num_experts):
        group = {}
        for proj in _PROJS:
            for param in _PARAMS:
                name = f"{prefix}.{proj}_proj.{param}"
                if name in stacked:
                    group[per_expert_name(name, e)] = stacked[name][e]
        groups.append(group)
    return groups


def tensor_groups(tensors: dict[str, mx.array], num_experts: int,
                  layout: str) -> list[dict[str, mx.array]]:
    """The output tensors in file order, in groups a shard never splits: each tensor alone in
    the stacked layout; in the per-expert layout, each expert's tensors together, where its
    layer's first stacked tensor was."""
    if layout == "stacked" or not num_experts:
        return [{name: value} for name, value in tensors.items()]
    order: list[str] = []  # tensor names, and each layer's prefix once
    layers: dict[str, dict[str, mx.array]] = {}
    for name, value in tensors.items():
        prefix = _layer_of(name)
        if prefix is None:
            order.append(name)
            continue
        if prefix not in layers:
            layers[prefix] = {}
            order.append(prefix)
        layers[prefix][name] = value
    groups: list[dict[str, mx.array]] = []
    for key in order:
        if key in layers:
            groups += _per_expert(key, layers[key], num_experts)
        else:
            groups.append({key: tensors[key]})
    return groups
