"""`mlx-mixtral bench --replay-routing FILE`: a recorded routing trace replayed through the
expert cache, without the model, at several slot counts and policies.

The slot counts come from `--max-memory` (planned from the sizes the trace recorded, as
loading would plan them) or directly from `--slots`. Each count runs under both policies, with
and without the guess; the replay decides exactly as the live pager (model/routing_trace.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import MlxMixtralError
from ..model.expert_cache import POLICIES
from ..model.routing_trace import RoutingTrace, load_trace, replay
from ..units import size


def slots_for_budgets(trace: RoutingTrace, budgets_text: str) -> list[tuple[str, int]]:
    """(label, slots per layer) for each budget of `--max-memory`, planned as `load` would
    plan it from the model's recorded sizes; a budget too small is one line."""
    import mlx.core as mx

    from ..loading.memory_plan import plan_for
    from ..model.config import ModelArgs
    from ..model.precision import target_dtype
    from .bench_paging import budget_specs, share_budget

    m = trace.model
    args = ModelArgs.from_dict(m["args"])
    dtype: mx.Dtype | None = target_dtype(m.get("dtype"))
    out = []
    for spec in budget_specs(budgets_text):
        if spec == "min":
            out.append(("min", args.num_experts_per_tok))
            continue
        budget = (share_budget(spec, int(m["model_bytes"])) if isinstance(spec, float)
                  else int(spec))
        plan = plan_for(args, budget, int(m["resident_bytes"]), int(m["experts_bytes"]), dtype)
        if not plan.fits:
            raise MlxMixtralError(f"--max-memory: {size(budget)} is too small for the traced "
                                  f"model ({m['name']}); give more, or --slots")
        out.append((f"{size(budget)} ({budget / int(m['model_bytes']):.0%})",
                    min(plan.slots, args.num_local_experts)))
    return out


def slot_counts(text: str, trace: RoutingTrace) -> list[tuple[str, int]]:
    """`--slots 2,4,6`: each between the model's top-k and its experts."""
    top_k, experts = int(trace.model["top_k"]), int(trace.model["num_experts"])
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part.isdigit() or not top_k <= int(part) <= experts:
            raise MlxMixtralError(f"--slots: {part!r} is not a number of experts per layer "
                                  f"between {top_k} (top-k) and {experts}")
        out.append((f"{part} slots", int(part)))
    return out


def replay_routing(path: Path, budgets_text: str | None, slots_text: str | None,
                   as_json: bool) -> str:
    trace = load_trace(path)
    counts = (slot_counts(slots_text, trace) if slots_text
              else slots_for_budgets(trace, budgets_text or ""))
    m = trace.model
    result: dict[str, Any] = {"trace": str(path), "model": m["name"],
                              "runs": len(trace.runs), "cases": []}
    for label, slots in counts:
        for policy in POLICIES:
            for prefetch in (True, False):
                r = replay(trace, slots, policy, prefetch)
                result["cases"].append({"budget": label, "slots": slots, "policy": policy,
                                        "prefetch": prefetch, **vars(r)})
    return json.dumps(result, indent=2) if as_json else format_replay(result, trace)


def format_replay(result: dict[str, Any], trace: RoutingTrace) -> str:
    m = trace.model
    lines = [f"routing trace {result['trace']}: {m['name']}, {m['num_layers']} layers of "
             f"{m['num_experts']} experts (top-{m['top_k']}), {result['runs']} runs recorded "
             f"{m.get('recorded', '')} (the first warms the cache); replayed without the "
             "model, decode only"]
    for c in result["cases"]:
        key = f"{c['policy']}{'+prefetch' if c['prefetch'] else ''}"
        guess = (f", guessed {c['guess_rate']:.0%}" if c["guess_rate"] is not None else "")
        lines.append(f"  {c['budget']:<18} {c['slots']} of {m['num_experts']} slots  "
                     f"{key:<13} hit rate {c['decode_hit_rate']:6.1%}{guess}, "
                     f"{c['reads_per_token']:.2f} experts and {size(c['bytes_per_token'])} "
                     "read per token")
    return "\n".join(lines)


# Cold reads with several threads on this project's machine (issue 26: 0.96-1.25 GB/s); a
# Mac's SSD reads faster, so on a Mac the estimate errs low.
READ_BYTES_PER_S = 1.2e9


def trace_estimates(trace: RoutingTrace, plans: list[tuple[str, Any]]) -> list[str]:
    """For `info --memory`: each (label, paging MemoryPlan)'s decode estimated by replaying
    `trace` with the same share of each layer's experts in memory (LRU with prefetch): hit
    rate, bytes read per token, and the tokens/s reading alone allows."""
    m = trace.model
    experts, top_k = int(m["num_experts"]), int(m["top_k"])
    replayed: dict[int, Any] = {}
    lines = [f"  from the routing trace {trace.path} ({m['name']}, recorded "
             f"{m.get('recorded', '?')}), replayed at each plan's share of experts in memory, "
             f"reads at {READ_BYTES_PER_S / 1e9:.1f} GB/s:"]
    for label, plan in plans:
        slots = min(max(round(plan.slots / plan.experts * experts), top_k), experts)
        if slots not in replayed:
            replayed[slots] = replay(trace, slots)
        r = replayed[slots]
        per_token = r.reads_per_token / trace.num_layers * plan.layers * plan.expert
        speed = READ_BYTES_PER_S / per_token if per_token else float("inf")
        lines.append(f"      {label:<10} hit rate {r.decode_hit_rate:.0%}, about "
                     f"{size(per_token)} read per token: reading allows {speed:.1f} tokens/s")
    return lines
