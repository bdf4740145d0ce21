"""`mlx-mixtral info`: what a model is, how big, and whether it fits this machine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..catalog.summary import summarize
from ..model.config import ModelArgs, preset
from ..units import human, size

if TYPE_CHECKING:
    from ..loading.source import ModelSource

FORMATS = {"mistral-v3": "mistral-v3 ([INST] as control tokens; tool calls)",
           "mistral-v1": "mistral-v1 ([INST] as text)",
           "template": "the model's own chat template (Jinja)",
           "plain": "plain text (no chat format)"}


def source_of(model: str) -> ModelSource:
    """The model's description from its headers alone: no tensor is read or dequantized."""
    from ..loading import describe, resolve

    return describe(resolve(model))


def chat_format_of(source: ModelSource) -> str:
    from ..errors import MlxMixtralError
    from ..loading.gguf_file import read_gguf_vocabulary
    from ..loading.loader import load_tokenizer

    try:
        metadata = read_gguf_vocabulary(source.path) if source.format == "gguf" else {}
        return load_tokenizer(source, metadata).chat_format
    except MlxMixtralError:
        return "none (no usable tokenizer)"


def describe(args: ModelArgs, name: str, source: ModelSource | None = None) -> str:
    total, active = args.parameter_counts()
    kind = "sparse mixture of experts" if args.is_moe else "dense decoder"
    summary = summarize(source) if source is not None else None
    kind += f" ({summary.family} architecture)" if summary else (
        " (Mixtral-style)" if args.is_moe else " (Mistral-style)")
    kv_per_token = args.kv_bytes_per_token()  # float16
    kv_tokens = args.sliding_window or args.max_position_embeddings
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
    if summary is not None:
        lines += [
            f"  stored as      {summary.stored_as}, {size(summary.disk_bytes)} on disk, "
            f"{size(summary.memory_bytes)} once loaded",
            f"  chat format    {FORMATS.get(fmt := chat_format_of(source), fmt)}",
        ]
    lines += [
        f"  window         {args.sliding_window or 'none (full attention)'}",
        f"  context        {args.max_position_embeddings} tokens",
        f"  vocabulary     {args.vocab_size}",
        f"  KV cache       {size(kv_per_token)} per token (float16), "
        f"{size(kv_per_token * kv_tokens)} at {kv_tokens} tokens",
    ]
    return "\n".join(lines)


# Options `plans` weighs: (label, expert bits, attention bits); None is float16.
PLAN_OPTIONS = [("float16", None, None), ("8-bit", 8, 8), ("6-bit", 6, 6), ("4-bit", 4, 4),
                ("mixed-3-4", 3, 4), ("3-bit", 3, 3), ("mixed-2-4", 2, 4)]


def plans(args: ModelArgs, budget: int, machine: bool, ranks: int = 1) -> str:
    """One memory table: for each precision, its weights (as on a Mac: float16 scales) and
    whether it runs in `budget` fully resident, paging N expert slots per layer (and the bytes
    read per token at the expected hit rate) or not at all; split over `ranks`, each rank's
    share."""
    import mlx.core as mx

    from ..convert.plan import Plan
    from ..loading.memory_plan import plan_for
    from .bench_paging import DEFAULT_SOURCE, expected_hit_rate, measured_hit_rates

    where = "available now on this machine" if machine else "--memory"
    split = f"  {'per rank of ' + str(ranks):>15}  fits" if ranks > 1 else ""
    lines = [f"  memory: {size(budget)} ({where}), with a KV cache of at least 2048 tokens"
             + (f"; split over {ranks} ranks (tensor parallel), each holds the embeddings and "
                "its share of every layer" if ranks > 1 else ""),
             f"    {'precision':<10} {'weights':>10}{split}  runs"
             + (" (on one machine)" if ranks > 1 else "")]
    total, _ = args.parameter_counts()
    whole = args.vocab_size * args.hidden_size * (1 if args.tie_word_embeddings else 2)
    paged = []  # (label, plan) of the rows that page
    for label, expert_bits, bits in PLAN_OPTIONS:
        plan = Plan(mx.float16, bits, 64, expert_bits=expert_bits if bits else None)
        experts, other = plan.estimate_parts(args)
        weights = experts + other
        p = plan_for(args, budget, other, experts, mx.float16)
        if not p.fits:
            how = "no (too big" + (", even paged)" if args.is_moe else ")")
        elif not p.paging:
            how = "fully resident"
        else:
            paged.append((label, p))
            hit = expected_hit_rate(p.slots / p.experts)
            per_token = p.layers * p.top_k * (1 - hit) * p.expert
            # misses only: the guess's reads ahead come on top (a routing trace counts them)
            how = (f"paging: {p.slots} of {p.experts} experts per layer in memory, about "
                   f"{size(per_token)} of misses read per token (hit rate {hit:.0%}; reads "
                   "ahead not counted)")
        row = f"    {label:<10} {size(weights):>10}"
        if ranks > 1:
            mine = weights * (whole + (total - whole) / ranks) / total
            row += f"  {size(mine):>15}  {'yes' if mine <= budget else 'no ':<4}"
        lines.append(f"{row}  {how}")
    if args.is_moe:  # the plans use the defaults; a measurement here is shown, labelled
        lines += [f"  {DEFAULT_SOURCE}"] + [f"  {m}" for m in [measured_hit_rates()] if m]
        lines += _from_trace(paged)
    return "\n".join(lines)


def _from_trace(paged: list) -> list[str]:
    """The paging rows estimated from the routing trace `bench --record-routing` last wrote
    here, labelled (none without a trace)."""
    from ..model.routing_trace import recorded_trace
    from .bench_routing import trace_estimates

    trace = recorded_trace() if paged else None
    return trace_estimates(trace, paged) if trace is not None else []


def info(model: str | None = None, preset_name: str | None = None, ranks: int = 1,
         memory: int | None = None) -> str:
    if preset_name:
        args, text = preset(preset_name), describe(preset(preset_name), preset_name)
    else:
        from ..loading import default_model

        model = model or default_model()
        source = source_of(model)
        args, text = source.args, describe(source.args, Path(model).name or model, source)
    from ..loading.memory import available_memory  # read now: `list` and the load check ask it

    budget = memory or available_memory()
    return f"{text}\n\n{plans(args, budget, memory is None, ranks)}"
