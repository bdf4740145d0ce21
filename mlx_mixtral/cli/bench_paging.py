"""`mlx-mixtral bench --max-memory`: expert paging against the fully resident model.

For each budget the same prompt runs fully resident and paged, with a warm page cache (a
warm-up run reads every expert once first). Reported: prefill and decode tokens/s and their
ratio to resident, peak memory against the budget, the expert-cache hit rate per layer while
decoding (LRU with prefetch, LRU without, LFU with), and the bytes read per generated token.

Then the reads themselves, in one run on the same model and budget: the reads before the reader
pool (one thread, every range read alone, misses in turn: "serial") against the pool
("pool": --read-threads threads, adjacent ranges coalesced), each cold and warm, the runs
interleaved. Cold: the weight files are dropped from the page cache before the run and every
range read is dropped again after it, as on a Mac whose memory cannot hold the model (on macOS
the reads bypass the cache, and `sudo purge` must empty it first). Reported: decode tokens/s,
read GB/s (bytes over the time some read was running), bytes read per token (and from the disk,
where the system counts them), the hit rate, and the process's peak RSS per budget.
The measured hit rates are kept in the data folder; `info` shows them, labelled as measured here,
below its plans (which use the defaults, so the same files give the same plans everywhere).

With drafting (`--prompt-lookup K`, `--draft-model M`, counted inside each budget) it also
decodes a prompt the model repeats (its own greedy continuation of a few random tokens) plainly
and drafted, side by side: bytes read and forward passes per generated token, and whether the
tokens are the same.
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
# The reads compared: (threads, new: see use_reads); None: --read-threads.
READS = {"serial": (1, False), "pool": (None, True)}
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
    read_gbps: float = 0.0  # decode's bytes read over the time some read was running
    disk_bytes_per_token: float = -1.0  # what the OS read from storage (-1: not counted)


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


def share_budget(share: float, model_bytes: int) -> int:
    """The budget "50%" means: half the model's size once loaded, plus the process's fixed
    memory outside MLX that every plan counts (memory_plan.OVERHEAD, ~14 MB), so that a
    share gives the model that share whatever its size (a tiny test model too)."""
    from ..loading.memory_plan import OVERHEAD

    return OVERHEAD + int(model_bytes * share)


def share_of(budget: int, model_bytes: int) -> float:
    """The share of the model a budget holds besides the fixed memory (`share_budget`'s
    inverse: "50%" reads back as 50%)."""
    from ..loading.memory_plan import OVERHEAD

    return (budget - OVERHEAD) / model_bytes


def parse_budgets(text: str, model_bytes: int, minimum: int) -> list[int]:
    """`budget_specs` in bytes: "min" the smallest that runs, a share of the model's size
    once loaded (`share_budget`)."""
    return [minimum if spec == "min" else share_budget(spec, model_bytes)
            if isinstance(spec, float) else spec for spec in budget_specs(text)]


def measure_paged(model: Any, prompt: mx.array, gen_tokens: int,
                  recorder: TraceRecorder | None = None) -> PagedRun:
    """One greedy run of a paged model; its speed and what its expert cache did (and its
    routing, a run of `recorder`'s trace)."""
    from mlx_lm.generate import generate_step

    from ..generation.stats import Clock
    from ..generation.stream import prefill_chunk, settle
    from ..loading.page_cache import disk_read_bytes

    pager = model.limits.expert_pager
    clock = getattr(pager.loader, "clock", None)  # ExpertFiles': time spent reading
    pager.reset_stats()
    if recorder is not None:
        recorder.start_run()
    settle()
    mx.reset_peak_memory()
    cache = model.make_cache()
    timer, tokens, at_first = Clock(), [], None
    read_s = disk = 0.0
    for token, _ in generate_step(prompt, model, max_tokens=gen_tokens, prompt_cache=cache,
                                  prefill_step_size=prefill_chunk(model)):
        timer.first_token()
        if at_first is None:
            pager.wait()
            at_first = copy.deepcopy(pager.stats)
            read_s, disk = clock.seconds if clock else 0.0, disk_read_bytes()
            if recorder is not None:
                recorder.mark_decode()
        tokens.append(token)
    pager.wait()
    stats = timer.stats(len(prompt), tokens)
    if recorder is not None:
        recorder.run.tokens = len(tokens)
    decode = pager.stats.since(at_first)
    total = decode.total()
    steps = max(len(tokens) - 1, 1)
    read_s = (clock.seconds - read_s) if clock else 0.0
    after = disk_read_bytes()
    return PagedRun(stats.prompt_tps, stats.generation_tps, stats.peak_memory,
                    [s.hit_rate for s in decode.layers], total.hit_rate,
                    total.prefetch_hits / max(total.hits, 1), total.bytes_read / steps,
                    [s.guess_rate for s in decode.layers], total.guess_rate,
                    total.bytes_read / read_s / 1e9 if read_s else 0.0,
                    (after - disk) / steps if after is not None and disk is not None else -1.0)


def warm_files(paths: list[Path]) -> None:
    """Read the files once, so that the page cache holds them (a warm run)."""
    buf = bytearray(1 << 24)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def use_reads(pager: Any, threads: int, new: bool) -> None:
    """Read with `threads` threads; `new`: coalesced ranges and wrong guesses withdrawn, else as
    the reads before the reader pool (the benchmarks' baseline: each range alone, every
    prefetch read to the end)."""
    pager.set_read_threads(threads)
    pager.loader.set_coalesce(new)
    pager.baseline = not new


def compare_reads(model: Any, paths: list[Path], prompt: mx.array, gen_tokens: int,
                  runs: int, read_threads: int, log) -> dict[str, Any]:
    """READS's variants, cold and warm, `runs` rounds interleaved; the medians by
    "serial cold" ... and whether the files could be dropped from the page cache."""
    from ..loading.page_cache import PURGE_NOTE, drop_files

    pager = model.limits.expert_pager
    loader = pager.loader
    pager.set_policy(VARIANTS[0][0], VARIANTS[0][1])
    done: dict[str, list[PagedRun]] = {}
    dropped = True
    for _ in range(runs):
        for name, (threads, new) in READS.items():
            use_reads(pager, threads or read_threads, new)
            for cold in (True, False):
                pager.set_policy(VARIANTS[0][0], VARIANTS[0][1])  # empty slots: same start
                if cold:
                    dropped = drop_files(paths) and dropped
                else:
                    warm_files(paths)
                loader.set_cold(cold)
                done.setdefault(f"{name} {'cold' if cold else 'warm'}", []).append(
                    measure_paged(model, prompt, gen_tokens))
                loader.set_cold(False)
    use_reads(pager, read_threads, True)
    if not dropped:
        log(PURGE_NOTE)
    out = {key: {name: statistics.median(getattr(r, name) for r in rs)
                 for name in ("decode_tps", "prefill_tps", "read_gbps", "bytes_per_token",
                              "disk_bytes_per_token", "decode_hit_rate")}
           for key, rs in done.items()}
    for key, v in out.items():
        guesses = [r.decode_guess_rate for r in done[key]]
        v["guess_rate"] = (statistics.median(guesses) if None not in guesses else None)
        log(f"  reads {key}: decode {v['decode_tps']:.2f} tok/s, {v['read_gbps']:.2f} GB/s")
    return {"read_threads": read_threads, "dropped": dropped, "runs": out}


@dataclass
class DecodeRun:
    """One greedy decode after a prefill, plain or drafted, on a paged model."""

    tokens: list[int]
    bytes_per_token: float  # read from disk per generated token, the prefill excluded
    passes_per_token: float  # the model's forward passes per generated token
    acceptance: float  # of the drafted tokens, the share the model kept
    decode_tps: float
    peak_memory: int


def repeating_prompt(model: Any, n: int, seed_tokens: int = 16) -> list[int]:
    """`n` tokens of the model's own greedy text, from a few random ones, once it has gone on
    for `n` tokens: a small random model's greedy text falls into loops, so its reply goes on
    repeating its prompt (as a reply that quotes its input does), which prompt lookup drafts.
    (The first `n` are left out: a loop takes a while to settle.)"""
    from mlx_lm.generate import generate_step

    seed = np.random.RandomState(1).randint(3, model.args.vocab_size, seed_tokens).tolist()
    more = generate_step(mx.array(seed), model, max_tokens=max(2 * n - seed_tokens, 0))
    return (seed + [int(t) for t, _ in more])[n:2 * n]


def measure_decode(model: Any, prompt: list[int], gen_tokens: int,
                   drafter: Any = None) -> DecodeRun:
    """Greedy decoding of `gen_tokens` after `prompt`, drafted with `drafter` or plain; the
    prompt but its last token is prefilled first, so that only decoding's reads count."""
    from ..generation import Stats, stream_generate
    from ..generation.sampling import SamplingParams
    from ..generation.stream import prefill_chunk, settle
    from .bench import Silent

    pager = model.limits.expert_pager
    cache = model.make_cache(slack=drafter.k if drafter is not None else 0)
    step = prefill_chunk(model)
    for start in range(0, len(prompt) - 1, step):
        model(mx.array([prompt[start:min(start + step, len(prompt) - 1)]]), cache=cache)
        mx.eval([c.state for c in cache])
    pager.wait()
    before = pager.stats.total().bytes_read
    settle()
    mx.reset_peak_memory()
    greedy = SamplingParams(temperature=0, min_p=0, max_tokens=gen_tokens)
    stats = next(s for s in stream_generate(model, Silent(), prompt[-1:], sampling=greedy,
                                            cache=cache, history=prompt[:-1], draft=drafter)
                 if isinstance(s, Stats))
    pager.wait()
    n = max(len(stats.tokens), 1)
    return DecodeRun(stats.tokens, (pager.stats.total().bytes_read - before) / n,
                     stats.forward_passes / n,
                     stats.draft_accepted / max(stats.draft_proposed, 1),
                     stats.generation_tps, stats.peak_memory)


def drafted_side_by_side(model: Any, prompt: list[int], gen_tokens: int,
                         drafter: Any) -> dict[str, Any]:
    """Plain and drafted decoding of `prompt` on the paged `model` (LRU with prefetch), each
    after a warm-up run."""
    pager = model.limits.expert_pager
    out: dict[str, Any] = {}
    for name, using in (("plain", None), ("drafted", drafter)):
        pager.set_policy(VARIANTS[0][0], VARIANTS[0][1])
        measure_decode(model, prompt, 8, using)  # warm: the page cache, first-call setup
        run = measure_decode(model, prompt, gen_tokens, using)
        out[name] = {k: v for k, v in asdict(run).items() if k != "tokens"}
        out[f"{name}_tokens"] = run.tokens
    out["same_tokens"] = out.pop("plain_tokens") == out.pop("drafted_tokens")
    return out


def _some_budget_fits(folder: Path, budgets: list[int], dtype: str | None, draft: Any) -> None:
    """Before the resident run (which may not fit in memory at all): when no budget can run,
    the first one's refusal, as one line (the others only get a note in the report)."""
    from ..loading import plan_load

    refusal = None
    for budget in budgets:
        try:
            plan_load(folder, tokenizer=False, dtype=dtype, max_memory=budget, draft=draft)
            return
        except MemoryLimitError as e:
            refusal = refusal or e
    if refusal is not None:
        raise refusal


def median_run(runs: list[PagedRun]) -> dict[str, Any]:
    """Each number's median over `runs`; the lists per layer (and a rate that was not
    measured, None) are the middle run's."""
    middle = asdict(runs[len(runs) // 2])
    return {name: statistics.median(getattr(r, name) for r in runs)
            if isinstance(value, (int, float)) else middle[name]
            for name, value in asdict(runs[0]).items()}


def bench_paging(folder: Path, budgets_text: str, prompt_tokens: int, gen_tokens: int,
                 runs: int, dtype: str | None, as_json: bool,
                 read_threads: int | None = None, record: Path | None = None,
                 drafting: Any = None, draft: Any = None) -> str:
    """`record`: write the routing of the first paging budget's default variant (its warm-up
    run, then its measured runs) there, as a routing trace (model/routing_trace.py).
    `drafting`: (model, tokenizer) -> Drafter, and `draft` its `DraftNeeds`, for the
    side-by-side run of drafted decoding within each budget."""
    from ..loading import describe, load
    from ..loading.memory import available_memory, load_bytes
    from ..loading.memory_plan import minimum_budget, pageable
    from ..loading.process_memory import current_rss, peak_rss, reset_peak_rss
    from ..model.expert_cache import DEFAULT_READ_THREADS
    from .bench import load_ours, measure

    read_threads = read_threads or DEFAULT_READ_THREADS
    source = describe(folder)
    if source.args.is_moe and not pageable(source):  # a GGUF whose experts do not stream
        from ..loading.gguf_experts import not_streamable

        raise not_streamable(source, budgets_text)
    model_bytes = load_bytes(source, dtype)
    budgets = parse_budgets(budgets_text, model_bytes, minimum_budget(source, dtype, draft=draft))
    _some_budget_fits(folder, budgets, dtype, draft)
    log = (lambda m: None) if as_json else (lambda m: print(m, flush=True))
    prompt = mx.array(np.random.RandomState(0).randint(3, source.args.vocab_size,
                                                       prompt_tokens))
    result: dict[str, Any] = {
        "model": str(folder), "model_bytes": model_bytes, "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens, "runs": runs, "device": str(mx.default_device()),
        "drafting": _drafting_label(draft), "resident": None, "budgets": []}
    repeated: list[int] = []
    have = available_memory()
    if have and model_bytes > have:  # the case budgets are for: the model does not fit
        result["resident_note"] = (f"not run: the model needs {size(model_bytes)} and "
                                   f"{size(have)} is available")
        log(f"resident: {result['resident_note']}")
    else:
        resident = load_ours(folder, dtype)
        measure(resident, prompt[:32], 4)  # warm up
        resident.runs = [measure(resident, prompt, gen_tokens) for _ in range(runs)]
        repeated = repeating_prompt(resident.model, prompt_tokens) if drafting else []
        result["resident"] = {k: resident.median(k) for k in ("prefill_tps", "decode_tps",
                                                              "peak_memory")}
        log(f"resident: decode {resident.median('decode_tps'):.2f} tok/s")
        del resident
        mx.clear_cache()
    for budget in budgets:
        start = time.perf_counter()
        rss_counted = reset_peak_rss()  # this budget's peak: loading and generation
        rss_before = current_rss()
        try:
            model, _ = load(folder, tokenizer=False, dtype=dtype, max_memory=budget,
                            read_threads=read_threads, draft=draft)
        except MemoryLimitError as e:  # the other budgets still run
            log(str(e))
            result["budgets"].append({"budget": budget, "share": share_of(budget, model_bytes),
                                      "note": str(e)})
            continue
        load_s = time.perf_counter() - start
        plan = model.limits.memory_plan
        log(str(plan))
        entry: dict[str, Any] = {"budget": budget, "share": share_of(budget, model_bytes),
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
        entry["reads"] = compare_reads(model, source.files, prompt, gen_tokens, runs,
                                       read_threads, log)
        entry["peak_rss"] = peak_rss() if rss_counted else None
        entry["rss_before"] = rss_before  # the process before loading (interpreter, imports)
        if drafting is not None:
            # the paged model's greedy text is the resident one's
            repeated = repeated or repeating_prompt(model, prompt_tokens)
            drafter = drafting(model, None)
            entry["drafted"] = drafted_side_by_side(model, repeated, gen_tokens, drafter)
            del drafter
        result["budgets"].append(entry)
        pager.close()
        del model, pager
        mx.clear_cache()
    if record is not None and "recorded" not in result:
        result["recorded"] = None
        log("no budget paged its experts: no routing trace was written")
    save_hit_rates(result)
    return json.dumps(result, indent=2) if as_json else format_paging(result)


def _runs(n: int) -> str:
    return "one run" if n == 1 else f"median of {n} runs"


def format_paging(result: dict[str, Any]) -> str:
    res = result["resident"]
    lines = [f"{result['model']}  ({size(result['model_bytes'])} once loaded; "
             f"{result['prompt_tokens']} prompt tokens, {result['gen_tokens']} generated, "
             f"{_runs(result['runs'])}, {result['device']}, warm page cache unless marked "
             "cold)",
             f"  fully resident: prefill {res['prefill_tps']:.1f} tok/s, decode "
             f"{res['decode_tps']:.2f} tok/s, peak {size(res['peak_memory'])}" if res else
             f"  fully resident: {result['resident_note']}"]
    for entry in result["budgets"]:
        head = (f"  budget {size(entry['budget'])} ({entry['share']:.0%} of the model + "
                f"{size(int(entry['budget'] - entry['share'] * result['model_bytes']))} fixed)")
        if "note" in entry:
            lines.append(f"{head}: {entry['note']}")
            continue
        head += f": {entry['slots']} of {entry['experts']} experts per layer in memory"
        lines.append(head)
        for key, v in entry["variants"].items():
            lines.append(
                f"    {key:<13} decode {v['decode_tps']:6.2f} tok/s"
                + (f" ({v['decode_tps'] / res['decode_tps']:.2f}x resident)" if res else "")
                + f", prefill {v['prefill_tps']:6.1f} tok/s"
                + (f" ({v['prefill_tps'] / res['prefill_tps']:.2f}x)" if res else "")
                + f", hit rate {v['decode_hit_rate']:.0%}"
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
        lines += format_reads(entry)
        if "drafted" in entry:
            lines.extend(_format_drafted(entry["drafted"], result["drafting"]))
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


def format_reads(entry: dict[str, Any]) -> list[str]:
    reads = entry.get("reads")
    if not reads:
        return []
    runs = reads["runs"]
    rss, before = entry.get("peak_rss"), entry.get("rss_before")
    lines = [f"    reads: serial (1 thread, each range alone) against the pool "
             f"({reads['read_threads']} thread{'s' if reads['read_threads'] > 1 else ''}, "
             "coalesced)"
             + ("" if reads["dropped"] else " - the page cache could not be dropped here")
             + (f"; peak RSS {size(rss)}, {size(rss - before)} over the process before "
                f"loading ({(rss - before) / entry['budget']:.2f}x the budget)"
                if rss and before else "")]
    for key, v in runs.items():
        disk = v["disk_bytes_per_token"]
        base = runs["serial " + key.split()[1]]["decode_tps"]
        lines.append(f"      {key:<11} decode {v['decode_tps']:6.2f} tok/s "
                     f"({v['decode_tps'] / base:.2f}x serial), read {v['read_gbps']:.2f} GB/s, "
                     f"{size(v['bytes_per_token'])} per token"
                     + (f" ({size(disk)} from disk)" if disk >= 0 else "")
                     + f", hit rate {v['decode_hit_rate']:.0%}")
    return lines


def _drafting_label(draft: Any) -> str | None:
    if draft is None:
        return None
    if draft.name is None:
        return f"prompt lookup {draft.tokens}"
    return f"draft model {draft.name}, {draft.tokens} tokens"


def _format_drafted(d: dict[str, Any], label: str) -> list[str]:
    plain, drafted = d["plain"], d["drafted"]
    ratio = drafted["bytes_per_token"] / max(plain["bytes_per_token"], 1)
    return [f"    drafted ({label}) next to plain decoding, lru+prefetch, on a prompt the "
            f"model repeats (same tokens: {'yes' if d['same_tokens'] else 'NO'}):",
            f"      read per token {size(drafted['bytes_per_token'])} vs "
            f"{size(plain['bytes_per_token'])} ({ratio:.2f}x), forward passes per token "
            f"{drafted['passes_per_token']:.2f} vs {plain['passes_per_token']:.2f}, drafts "
            f"accepted {drafted['acceptance']:.0%}, decode {drafted['decode_tps']:.2f} vs "
            f"{plain['decode_tps']:.2f} tok/s, peak {size(drafted['peak_memory'])} vs "
            f"{size(plain['peak_memory'])}"]


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
