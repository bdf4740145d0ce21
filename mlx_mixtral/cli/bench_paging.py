"""`mlx-mixtral bench --max-memory`: expert paging against the fully resident model.

For each budget the same prompt runs fully resident and paged, with a warm page cache (a
warm-up run reads every expert once first). Reported: prefill and decode tokens/s and their
ratio to resident, peak memory against the budget, the expert-cache hit rate per layer while
decoding (LRU with prefetch, LRU without, LFU with), and the bytes read per generated token.
The measured hit rates are kept in the data folder; `info` shows them, labelled as measured here,
below its plans (which use the defaults, so the same files give the same plans everywhere).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import MemoryLimitError, MlxMixtralError
from ..model.expert_cache import PagingStats
from ..model.routing_trace import RoutingTrace, TraceRecorder
from ..units import size

VARIANTS = (("lru", True), ("lru", False), ("lfu", True))  # the first is the default
HIT_RATES_FILE = "expert-hit-rates.json"


@dataclass
class PagedRun:
    prefill_tps: float
    decode_tps: float
    peak_memory: int
    decode_hit_rates: list[float]  # per layer
    decode_hit_rate: float
    prefetch_share: float  # of decode hits, the share the prefetch provided
    bytes_per_token: float  # read from disk per generated token
    decode_guess_rates: list[float | None]  # per layer: share of needed experts guessed
    decode_guess_rate: float | None  # over the layers that guess (None without prefetch)


def budget_specs(text: str) -> list[str | float | int]:
    """"min,50%,75%" or sizes ("8GB,12GB") checked, before any model is built: "min", a share
    of the model's size, or bytes."""
    from ..loading.memory_plan import budget_bytes

    out: list[str | float | int] = []
    for part in (p.strip() for p in text.split(",")):
        if part == "min":
            out.append(part)
        elif part.endswith("%"):
            try:
                share = float(part[:-1]) / 100
            except ValueError:
                share = -1
            if not 0 < share <= 1:
                raise MlxMixtralError(f"--max-memory: {part!r} is not a share between 0% and "
                                      "100% of the model")
            out.append(share)
        else:
            out.append(budget_bytes(part))
    return out


def parse_budgets(text: str, model_bytes: int, minimum: int) -> list[int]:
    """`budget_specs` in bytes: "min" the smallest that runs, a share of the model's size
    once loaded."""
    return [minimum if spec == "min" else int(model_bytes * spec) if isinstance(spec, float)
            else spec for spec in budget_specs(text)]


def measure_paged(model: Any, prompt: mx.array, gen_tokens: int,
                  recorder: TraceRecorder | None = None) -> PagedRun:
    """One greedy run of a paged model; its speed and what its expert cache did (and its
    routing, a run of `recorder`'s trace)."""
    from mlx_lm.generate import generate_step

    from ..generation.stats import Clock
    from ..generation.stream import prefill_chunk, settle

    pager = model.limits.expert_pager
    pager.reset_stats()
    if recorder is not None:
        recorder.start_run()
    settle()
    mx.reset_peak_memory()
    cache = model.make_cache()
    clock, tokens, at_first = Clock(), [], None
    for token, _ in generate_step(prompt, model, max_tokens=gen_tokens, prompt_cache=cache,
                                  prefill_step_size=prefill_chunk(model)):
        clock.first_token()
        if at_first is None:
            pager.wait()
            at_first = copy.deepcopy(pager.stats)
            if recorder is not None:
                recorder.mark_decode()
        tokens.append(token)
    pager.wait()
    stats = clock.stats(len(prompt), tokens)
    if recorder is not None:
        recorder.run.tokens = len(tokens)
    decode = pager.stats.since(at_first)
    total = decode.total()
    return PagedRun(stats.prompt_tps, stats.generation_tps, stats.peak_memory,
                     [s.hit_rate for s in decode.layers], total.hit_rate,
                     total.prefetch_hits / max(total.hits, 1),
                     total.bytes_read / max(len(tokens) - 1, 1),
                     [s.guess_rate for s in decode.layers], total.guess_rate)


def median_run(runs: list[PagedRun]) -> dict[str, Any]:
    """Each number's median over `runs`; the lists per layer (and a rate that was not
    measured, None) are the middle run's."""
    middle = asdict(runs[len(runs) // 2])
    return {name: statistics.median(getattr(r, name) for r in runs)
            if isinstance(value, (int, float)) else middle[name]
            for name, value in asdict(runs[0]).items()}


def bench_paging(folder: Path, budgets_text: str, prompt_tokens: int, gen_tokens: int,
                    runs: int, dtype: str | None, as_json: bool,
                    record: Path | None = None) -> str:
    """`record`: write the routing of the first paging budget's default variant (its warm-up
    run, then its measured runs) there, as a routing trace (model/routing_trace.py)."""
    from ..loading import describe, load
    from ..loading.memory import load_bytes
    from ..loading.memory_plan import minimum_budget
    from .bench import load_ours, measure

    source = describe(folder)
    model_bytes = load_bytes(source, dtype)
    budgets = parse_budgets(budgets_text, model_bytes, minimum_budget(source, dtype))
    log = (lambda m: None) if as_json else (lambda m: print(m, flush=True))
    resident = load_ours(folder, dtype)
    vocab = resident.model.args.vocab_size
    prompt = mx.array(np.random.RandomState(0).randint(3, vocab, prompt_tokens))
    measure(resident, prompt[:32], 4)  # warm up
    resident.runs = [measure(resident, prompt, gen_tokens) for _ in range(runs)]
    result: dict[str, Any] = {
        "model": str(folder), "model_bytes": model_bytes, "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens, "runs": runs, "device": str(mx.default_device()),
        "resident": {k: resident.median(k) for k in ("prefill_tps", "decode_tps",
                                                     "peak_memory")},
        "budgets": []}
    log(f"resident: decode {resident.median('decode_tps'):.2f} tok/s")
    del resident
    mx.clear_cache()
    for budget in budgets:
        start = time.perf_counter()
        try:
            model, _ = load(folder, tokenizer=False, dtype=dtype, max_memory=budget)
        except MemoryLimitError as e:  # the other budgets still run
            log(str(e))
            result["budgets"].append({"budget": budget, "share": budget / model_bytes,
                                      "note": str(e)})
            continue
        load_s = time.perf_counter() - start
        plan = model.limits.memory_plan
        log(str(plan))
        entry: dict[str, Any] = {"budget": budget, "share": budget / model_bytes,
                                 "slots": plan.slots, "experts": plan.experts,
                                 "load_s": load_s, "variants": {}}
        if not plan.paging:
            entry["note"] = "the whole model fits: nothing is paged"
            result["budgets"].append(entry)
            continue
        pager = model.limits.expert_pager
        for i, (policy, prefetch) in enumerate(VARIANTS):
            pager.set_policy(policy, prefetch)
            recorder = None
            if record is not None and i == 0 and "recorded" not in result:
                recorder = TraceRecorder(trace_header(source, dtype, plan, prompt_tokens,
                                                      gen_tokens))
                pager.recorder = recorder
            measure_paged(model, prompt[:64], 8, recorder)  # warm: every expert read once
            n = runs if i == 0 else 1
            done = [measure_paged(model, prompt, gen_tokens, recorder) for _ in range(n)]
            if recorder is not None:
                pager.recorder = None
                result["recorded"] = save_recorded(recorder.trace, pager.stats, record)
            key = f"{policy}{'+prefetch' if prefetch else ''}"
            entry["variants"][key] = median_run(done)
            log(f"  {key}: decode {entry['variants'][key]['decode_tps']:.2f} tok/s, hit rate "
                f"{entry['variants'][key]['decode_hit_rate']:.0%}"
                + (f", guessed {guess:.0%}" if (guess := entry["variants"][key][
                    "decode_guess_rate"]) is not None else ""))
        result["budgets"].append(entry)
        pager.close()
        del model, pager
        mx.clear_cache()
    if record is not None and "recorded" not in result:
        result["recorded"] = None
        log("no budget paged its experts: no routing trace was written")
    save_hit_rates(result)
    return json.dumps(result, indent=2) if as_json else format_paging(result)


def format_paging(result: dict[str, Any]) -> str:
    res = result["resident"]
    lines = [f"{result['model']}  ({size(result['model_bytes'])} once loaded; "
             f"{result['prompt_tokens']} prompt tokens, {result['gen_tokens']} generated, "
             f"median of {result['runs']} runs, {result['device']}, warm page cache)",
             f"  fully resident: prefill {res['prefill_tps']:.1f} tok/s, decode "
             f"{res['decode_tps']:.2f} tok/s, peak {size(res['peak_memory'])}"]
    for entry in result["budgets"]:
        head = f"  budget {size(entry['budget'])} ({entry['share']:.0%})"
        if "note" in entry:
            lines.append(f"{head}: {entry['note']}")
            continue
        head += f": {entry['slots']} of {entry['experts']} experts per layer in memory"
        lines.append(head)
        for key, v in entry["variants"].items():
            lines.append(
                f"    {key:<13} decode {v['decode_tps']:6.2f} tok/s "
                f"({v['decode_tps'] / res['decode_tps']:.2f}x resident), prefill "
                f"{v['prefill_tps']:6.1f} tok/s ({v['prefill_tps'] / res['prefill_tps']:.2f}x)"
                f", hit rate {v['decode_hit_rate']:.0%}"
                + (f" ({v['prefetch_share']:.0%} of hits prefetched)" if "prefetch" in key
                   else "")
                + f", {size(v['bytes_per_token'])} read per token, peak "
                f"{size(v['peak_memory'])}")
            lines.append("      hit rate per layer: "
                         + " ".join(f"{h:.0%}" for h in v["decode_hit_rates"]))
            if v.get("decode_guess_rate") is not None:
                lines.append(f"      guessed {v['decode_guess_rate']:.0%} of needed experts; "
                             "per layer: " + " ".join("-" if g is None else f"{g:.0%}"
                                                      for g in v["decode_guess_rates"]))
    if result.get("recorded"):
        lines.append(f"  routing trace written to {result['recorded']} (replay it with bench "
                     "--replay-routing FILE --max-memory ...)")
    return "\n".join(lines)


def trace_header(source: Any, dtype: str | None, plan: Any, prompt_tokens: int,
                 gen_tokens: int) -> RoutingTrace:
    """An empty trace naming the model, its shape and sizes (for replays at other budgets)."""
    from ..loading.memory import load_bytes
    from ..loading.memory_plan import model_sizes
    from ..model.precision import DTYPES, target_dtype

    args = source.args
    resident, experts = model_sizes(source, dtype)
    target = target_dtype(dtype)  # as resolved here (the replay may run on another backend)
    return RoutingTrace({
        "name": str(source.path), "args": args.to_dict(),
        "dtype": next((k for k, v in DTYPES.items() if v == target), None),
        "num_layers": args.num_hidden_layers, "num_experts": args.num_local_experts,
        "top_k": args.num_experts_per_tok, "model_bytes": load_bytes(source, dtype),
        "resident_bytes": resident, "experts_bytes": experts, "expert_bytes": plan.expert,
        "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
        "recorded_slots": plan.slots, "recorded": time.strftime("%Y-%m-%d %H:%M")})


def save_recorded(trace: RoutingTrace, stats: PagingStats, path: Path) -> str:
    """Write the trace, each expert costing what the live reads cost, and remember where it
    is (for `info --memory`)."""
    from ..model.routing_trace import remember_trace, save_trace

    total = stats.total()
    if total.reads:
        trace.model["expert_bytes"] = total.bytes_read // total.reads
    try:
        save_trace(trace, path)
    except OSError as e:
        raise MlxMixtralError(f"--record-routing: cannot write {path} ({e.strerror or e})"
                              ) from None
    remember_trace(path)
    return str(path)


def hit_rates_path() -> Path:
    from ..user_files import data_dir

    return data_dir() / HIT_RATES_FILE


def save_hit_rates(result: dict[str, Any]) -> None:
    """Keep the default variant's decode hit rate by share of experts in memory."""
    from ..user_files import write_json

    rates = {f"{e['slots']}/{e['experts']}": e["variants"][VARIANTS[0][0] + "+prefetch"][
        "decode_hit_rate"] for e in result["budgets"] if e.get("variants")}
    if rates:
        write_json(hit_rates_path(), {"model": result["model"], "hit_rates": rates})


# Decode hit rates by share of experts in memory, measured by `bench --max-memory` on this
# project's machine (preset mixtral-tiny, synthetic routing; LRU with prefetch). `info` plans
# with these, so that the same files give the same answer on every machine.
DEFAULT_HIT_RATES = {0.25: 0.63, 0.5: 0.86}  # 2026-11-30: 2 and 4 slots of 8
DEFAULT_SOURCE = ("hit rates: defaults measured on mixtral-tiny with synthetic routing "
                  "(LRU with prefetch)")


def expected_hit_rate(share: float) -> float:
    """The decode hit rate with `share` of each layer's experts in memory, interpolated from
    DEFAULT_HIT_RATES."""
    points = {0.0: 0.0, **DEFAULT_HIT_RATES, 1.0: 1.0}
    xs = sorted(points)
    return float(np.interp(share, xs, [points[x] for x in xs]))


def measured_hit_rates() -> str | None:
    """One line with the hit rates the last `bench --max-memory` here measured, naming its
    model and file; None when there are none (or the file is damaged)."""
    from ..jsonfile import read_json_object

    path = hit_rates_path()
    if not path.is_file():
        return None
    try:
        saved = read_json_object(path, MlxMixtralError)
        rates = ", ".join(f"{float(v):.0%} with {k} experts"
                          for k, v in saved.get("hit_rates", {}).items())
    except (MlxMixtralError, ValueError, TypeError, AttributeError):
        return None
    if not rates:
        return None
    return f"measured here by bench --max-memory on {saved.get('model', '?')}: {rates} ({path})"
