"""`mlx-mixtral info`: what a model is, how big, and whether it fits this machine."""

from __future__ import annotations

from pathlib import Path

from ..loading.memory import USABLE_SHARE, machine_memory
from ..model.config import ModelArgs, preset
from ..units import gb, human

# Affine quantization stores a float16 scale and bias per group of 64 weights: +0.5 bit.
TABLE = [("float16", 16.0), ("8-bit", 8.5), ("6-bit", 6.5), ("4-bit", 4.5), ("3-bit", 3.5)]


def args_of(model: str) -> ModelArgs:
    """The model's shape from its headers alone: no tensor is read or dequantized."""
    from ..loading import describe, resolve

    return describe(resolve(model)).args


def describe(args: ModelArgs, name: str) -> str:
    total, active = args.parameter_counts()
    kind = ("sparse mixture of experts (Mixtral-style)" if args.is_moe
            else "dense decoder (Mistral-style)")
    kv_per_token = 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * 2
    kv_tokens = args.sliding_window or args.max_position_embeddings
    memory = machine_memory()
    usable = memory * USABLE_SHARE
    lines = [
        f"{name}",
        f"  architecture   {kind}",
        f"  parameters     {human(total, 'B')} total, {human(active, 'B')} active per token",
        f"  layers         {args.num_hidden_layers}, hidden {args.hidden_size}, "
        f"{args.num_attention_heads} heads / {args.num_key_value_heads} KV heads, "
        f"head dim {args.head_dim}",
    ]
    if args.is_moe:
        lines.append(f"  experts        {args.num_local_experts}, top-{args.num_experts_per_tok}")
    lines += [
        f"  window         {args.sliding_window or 'none (full attention)'}",
        f"  context        {args.max_position_embeddings} tokens",
        f"  vocabulary     {args.vocab_size}",
        "",
        f"  memory for the weights (this machine: {gb(memory)}, about {gb(usable)} usable):",
        f"    {'precision':<10} {'weights':>10}  fits",
    ]
    for label, bits in TABLE:
        size = total * bits / 8
        lines.append(f"    {label:<10} {gb(size):>10}  {'yes' if size <= usable else 'no'}")
    lines.append(f"  KV cache (float16): {kv_per_token / 1e3:.0f} KB per token, "
                 f"{gb(kv_per_token * kv_tokens)} at {kv_tokens} tokens")
    return "\n".join(lines)


def info(model: str | None = None, preset_name: str | None = None) -> str:
    if preset_name:
        return describe(preset(preset_name), preset_name)
    from ..loading import default_model

    model = model or default_model()
    return describe(args_of(model), Path(model).name or model)
