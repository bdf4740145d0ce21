"""Synthetic Hugging Face checkpoints of a given shape, for benchmarks and tests.

Written tensor by tensor in Hugging Face's layout (per-expert `experts.E.w1/w2/w3`, sharded,
with `model.safetensors.index.json`), so they exercise the real loading and conversion paths
without a download. Memory use is one shard at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx

from ..model.config import ModelArgs


def hf_tensor_shapes(args: ModelArgs) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Hugging Face Mistral / Mixtral checkpoint, in file order."""
    h, hd, inter = args.hidden_size, args.head_dim, args.intermediate_size
    yield "model.embed_tokens.weight", (args.vocab_size, h)
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (args.num_attention_heads * hd, h)
        yield p + "self_attn.k_proj.weight", (args.num_key_value_heads * hd, h)
        yield p + "self_attn.v_proj.weight", (args.num_key_value_heads * hd, h)
        yield p + "self_attn.o_proj.weight", (h, args.num_attention_heads * hd)
        if args.is_moe:
            yield p + "block_sparse_moe.gate.weight", (args.num_local_experts, h)
            for e in range(args.num_local_experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                yield q + "w1.weight", (inter, h)
                yield q + "w2.weight", (h, inter)
                yield q + "w3.weight", (inter, h)
        else:
            yield p + "mlp.gate_proj.weight", (inter, h)
            yield p + "mlp.up_proj.weight", (inter, h)
            yield p + "mlp.down_proj.weight", (h, inter)
    yield "model.norm.weight", (h,)
    if not args.tie_word_embeddings:
        yield "lm_head.weight", (args.vocab_size, h)


# The projections that write a layer's branch back into the residual stream.
RESIDUAL_OUTPUTS = ("self_attn.o_proj.weight", ".w2.weight", "mlp.down_proj.weight")


def write_hf_checkpoint(folder: str | Path, args: ModelArgs, dtype: mx.Dtype = mx.bfloat16,
                        shard_bytes: int = 2 * 10**9, seed: int = 0,
                        residual_scale: float = 1.0) -> int:
    """Write a random checkpoint; returns its size in bytes. `residual_scale` multiplies the
    residual branches' output projections: below 1, each layer changes the residual stream
    less (as a trained model's layers do; bench.py's `mixtral-realistic`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = mx.random.key(seed)
    shards: list[dict[str, mx.array]] = [{}]
    size, total = 0, 0
    weight_map: dict[str, int] = {}

    def flush() -> None:
        index = len(shards)
        mx.save_safetensors(str(folder / f"part-{index}.safetensors"), shards[-1],
                            metadata={"format": "pt"})
        shards[-1] = {}

    for name, shape in hf_tensor_shapes(args):
        key, sub = mx.random.split(key)
        if len(shape) == 1:
            value = mx.ones(shape, dtype)
        else:
            scale = shape[-1] ** -0.5 * (residual_scale if name.endswith(RESIDUAL_OUTPUTS)
                                         else 1.0)
            value = (mx.random.normal(shape, key=sub) * scale).astype(dtype)
        if size and size + value.nbytes > shard_bytes:
            flush()
            shards.append({})
            size = 0
        mx.eval(value)
        shards[-1][name] = value
        weight_map[name] = len(shards)
        size += value.nbytes
        total += value.nbytes
    flush()
    count = len(shards)
    names = {i: f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)}
    for i, name in names.items():
        (folder / f"part-{i}.safetensors").rename(folder / name)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total},
         "weight_map": {k: names[v] for k, v in weight_map.items()}}, indent=2))
    config = args.to_dict()
    config.pop("router_aux_loss_coef", None)
    config["torch_dtype"] = {mx.bfloat16: "bfloat16", mx.float16: "float16"}.get(dtype,
                                                                                  "float32")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total
