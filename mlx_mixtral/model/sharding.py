"""Splitting a model over the ranks of an `mx.distributed` group (MLX's own transport).

- **Tensor parallel** (`shard_tensors`): every rank holds 1/N of every layer. Attention heads
  are split (q/k/v all-to-sharded, o sharded-to-all), each expert's gate/up all-to-sharded and
  down sharded-to-all, the dense MLP the same way: one `all_sum` after attention and one after
  the MLP or MoE. The router and the norms stay whole on every rank, in float32, so every rank
  picks the same experts. Each rank's KV cache holds only its own heads.
- **Pipeline parallel** (`shard_layers`): rank r holds a contiguous run of layers, and the
  hidden state travels rank to rank: fewer, larger messages, better over Ethernet.

Both leave the embeddings and the output head whole on every rank, so every rank computes the
same logits and samples the same tokens. Done on the lazy (memory-mapped) model before its
weights are read, so each rank reads only what it holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
from mlx.nn.layers.distributed import shard_inplace, shard_linear

from ..errors import ConfigError
from .config import ModelArgs

if TYPE_CHECKING:
    from .decoder import DecoderStack, Model


def check_pipeline(layers: int, size: int) -> None:
    """Refuse more pipeline ranks than layers."""
    if size > layers:
        raise ConfigError(f"{size} ranks for {layers} layers: pipeline mode needs at least one "
                          "layer per rank; use fewer ranks")


def check_world(args: ModelArgs, size: int, pipeline: bool) -> None:
    """Refuse a world size the model cannot be split into (before anything is loaded). The
    splitting functions below trust it: the loader checks once, `Model.shard` and
    `DecoderStack.pipeline` (mlx-lm's protocol) check for other callers."""
    if size <= 1:
        return
    if pipeline:
        check_pipeline(args.num_hidden_layers, size)
        return
    parts = {"attention heads": args.num_attention_heads,
             "KV heads": args.num_key_value_heads,
             "MLP width": args.intermediate_size}
    bad = [f"{count} {what}" for what, count in parts.items() if count % size]
    if bad:
        sizes = [n for n in range(2, args.num_key_value_heads + 1)
                 if all(count % n == 0 for count in parts.values())]
        hint = (f"use {' or '.join(map(str, sizes))} ranks" if sizes else "use one rank")
        raise ConfigError(f"{size} ranks cannot split {', '.join(bad)} evenly in tensor mode; "
                          f"{hint}, or pipeline=True", params=("pipeline",))


def shard_tensors(model: Model, group: mx.distributed.Group) -> None:
    """Tensor parallel, in place (see the module doc)."""
    n = group.size()
    for layer in model.layers:
        attn = layer.self_attn
        if "qkv_proj" in attn:  # fused: shard q, k and v each, as segments of one weight
            q = attn.n_heads * attn.head_dim
            kv = attn.n_kv_heads * attn.head_dim
            attn.qkv_proj = shard_linear(attn.qkv_proj, "all-to-sharded",
                                         segments=[q, q + kv], group=group)
        else:
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, shard_linear(attn[name], "all-to-sharded", group=group))
        attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
        attn.n_heads //= n
        attn.n_kv_heads //= n
        if layer.is_moe:
            moe = layer.block_sparse_moe
            experts = moe.switch_mlp
            if "gate_up_proj" in experts:
                shard_inplace(experts.gate_up_proj, "all-to-sharded", segments=2, group=group)
            else:
                shard_inplace(experts.gate_proj, "all-to-sharded", group=group)
                shard_inplace(experts.up_proj, "all-to-sharded", group=group)
            shard_inplace(experts.down_proj, "sharded-to-all", group=group)
            moe.group = group  # the MoE sums the ranks' partial outputs itself
        else:
            mlp = layer.mlp
            mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
            mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
            mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)


def layer_range(layers: int, size: int, rank: int) -> range:
    """The layers rank `rank` of `size` holds: contiguous runs, as even as can be."""
    bounds = [round(i * layers / size) for i in range(size + 1)]
    return range(bounds[rank], bounds[rank + 1])


def shard_layers(stack: DecoderStack, group: mx.distributed.Group) -> None:
    """Pipeline parallel, in place: keep this rank's layers, drop the others unread."""
    size, rank = group.size(), group.rank()
    held = layer_range(len(stack.layers), size, rank)
    stack.layers = stack.layers[held.start:held.stop]
    stack.pipeline_group = group


def run_pipeline(layers: list, h: mx.array, mask: object, cache: list, trace: object,
                 group: mx.distributed.Group) -> mx.array:
    """This rank's layers between the previous rank's hidden state and the next rank; every
    rank returns the last rank's output."""
    size, rank = group.size(), group.rank()
    if rank > 0:
        h = mx.distributed.recv_like(h, rank - 1, group=group)
    for layer, c in zip(layers, cache, strict=True):
        h = layer(h, mask, c, trace)
    if rank < size - 1:
        h = mx.distributed.send(h, rank + 1, group=group)
    # Everyone takes the last rank's rows.
    h = mx.distributed.all_gather(h, group=group)[-h.shape[0]:]
    # Evaluated here, on every rank in the same order: a caller that evaluates only the KV
    # caches (a prefill chunk) would otherwise leave the first rank's send unrun while the
    # next rank waits for it.
    mx.eval(h)
    return h
