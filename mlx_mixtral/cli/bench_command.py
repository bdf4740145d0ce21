"""`mlx-mixtral bench`: speed and memory, against mlx-lm, within budgets, over ranks."""

from __future__ import annotations

import argparse

from ..errors import MlxMixtralError
from .commands import add_command, model_or_preset
from .distributed import add_distributed_flags, launched
from .drafting import add_draft_flags, add_kv_flags, drafting_from, kv_from
from .flags import add_model_flags


def add_bench(sub: argparse._SubParsersAction) -> None:
    from .bench import PRESETS as BENCH_PRESETS

    p = add_command(sub, "bench", run_bench)
    model_or_preset(p, "a model folder, a .gguf file or a Hugging Face repo id (mlx-lm's "
                     "--compare needs a folder)", BENCH_PRESETS,
                     "a synthetic model (built and cached on first use)")
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompt length")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens generated per run")
    p.add_argument("--runs", type=int, default=3, help="runs per engine (medians reported)")
    p.add_argument("--compare", choices=["mlx-lm"], default=None, help="run a peer too")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_model_flags(p, model=False, sampling=False)
    add_routing_flags(p)
    add_kv_flags(p)
    add_draft_flags(p)
    add_distributed_flags(p)


def add_routing_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--record-routing", default=None, metavar="FILE",
                   help="with --max-memory: write which experts every token chose in every "
                   "layer, and what the prefetch guessed, as a JSON routing trace")
    p.add_argument("--replay-routing", default=None, metavar="FILE",
                   help="replay a routing trace through the expert cache without the model, "
                   "at the budgets of --max-memory (or --slots): hit rate, reads per token")
    p.add_argument("--slots", default=None, metavar="N,N",
                   help="with --replay-routing: experts per layer in memory, instead of "
                   "budgets")


def run_bench(args: argparse.Namespace) -> int:
    from .bench import bench_main

    _check_routing(args)
    if args.replay_routing:
        from pathlib import Path

        from .bench_routing import replay_routing

        print(replay_routing(Path(args.replay_routing), args.max_memory, args.slots,
                             args.json))
        return 0
    drafting, kv = _checked(args)  # every flag, before a preset is built or a model read
    if launched():
        return _bench_launched(args, drafting, kv)
    if args.max_memory:
        return _bench_paging(args, drafting)
    print(bench_main(args.model, args.preset, args.prompt_tokens, args.gen_tokens, args.runs,
                     args.compare == "mlx-lm", args.json, args.force, args.dtype, drafting,
                     kv))
    return 0


def _check_routing(args: argparse.Namespace) -> None:
    """The routing trace flags' combinations, refused in one line."""
    if args.replay_routing:
        if args.record_routing or args.model or args.preset:
            raise MlxMixtralError("--replay-routing runs without a model: leave out --model, "
                                  "--preset and --record-routing")
        if bool(args.max_memory) == bool(args.slots):
            raise MlxMixtralError("--replay-routing needs the budgets to replay: give "
                                  "--max-memory SIZE[,SIZE...] or --slots N[,N...] (one)")
    elif args.slots:
        raise MlxMixtralError("--slots is for --replay-routing; bench a model with "
                              "--max-memory")
    elif args.record_routing and not args.max_memory:
        raise MlxMixtralError("--record-routing records what the expert cache sees: give "
                              "--max-memory too (a budget that pages; the routing does not "
                              "depend on it)")
    elif args.record_routing:
        from pathlib import Path

        folder = Path(args.record_routing).expanduser().resolve().parent
        if not folder.is_dir():
            raise MlxMixtralError(f"--record-routing: {folder} is not a folder; name a file "
                                  "in one that exists")


def _checked(args: argparse.Namespace) -> tuple:
    """The flags' values and combinations refused in one line, before anything is built:
    (drafting, kv)."""
    from .bench_paging import budget_specs

    if args.prompt_tokens < 1 or args.gen_tokens < 2 or args.runs < 1:
        raise MlxMixtralError("--prompt-tokens and --runs must be >= 1, --gen-tokens >= 2")
    if not args.model and not args.preset:
        args.preset = "mixtral-tiny"
    drafting, kv = drafting_from(args, args.force, args.dtype), kv_from(args)
    if launched():
        if args.compare or drafting or kv.bits is not None:
            raise MlxMixtralError("under mlx.launch, bench runs our engine alone: leave out "
                                  "--compare, drafting and --kv-bits")
        if args.max_memory and len(budget_specs(args.max_memory)) != 1:
            raise MlxMixtralError("under mlx.launch, bench --max-memory takes one budget (each "
                                  "rank's), not a list")
    elif args.max_memory:
        budget_specs(args.max_memory)
        if args.compare or kv.bits is not None:
            raise MlxMixtralError("bench --max-memory compares paging with our own resident "
                                  "run: leave out --compare and --kv-bits")
    elif kv.bits is not None and args.compare:
        raise MlxMixtralError("--kv-bits with --compare mlx-lm: mlx-lm cannot quantize a "
                              "rolling cache; compare without --kv-bits")
    return drafting, kv


def _bench_paging(args: argparse.Namespace, drafting) -> int:
    from pathlib import Path

    from .bench import preset_folder
    from .bench_paging import bench_paging
    from .drafting import draft_needs_from

    draft = draft_needs_from(args, args.dtype)  # (a missing draft model: before the bench)
    folder = preset_folder(args.preset) if args.preset else _bench_folder(args.model)
    record = Path(args.record_routing) if args.record_routing else None
    print(bench_paging(folder, args.max_memory, args.prompt_tokens, args.gen_tokens,
                       args.runs, args.dtype, args.json, args.read_threads, record,
                       drafting, draft))
    return 0


def _bench_folder(name: str):
    """The model's folder or GGUF file (a GGUF's experts stream when they are Q4_0, Q4_1 or
    Q8_0; other types are refused by the plan, in one line)."""
    from ..loading import resolve

    return resolve(name)


def _bench_launched(args: argparse.Namespace, drafting, kv) -> int:
    """bench under mlx.launch: the model split over the ranks, rank 0 reports."""
    import mlx.core as mx

    from ..loading import plan_load
    from .bench import bench_distributed, preset_folder
    from .distributed import join

    group, dog = join(args.dist_timeout)
    if args.preset and group.rank() == 0:
        preset_folder(args.preset)  # built once, by rank 0, before the others look
    mx.eval(mx.distributed.all_sum(mx.array(1), group=group))
    folder = preset_folder(args.preset) if args.preset else args.model
    budget = _rank_budget(folder, args) if args.max_memory else None
    plan = plan_load(folder, dtype=args.dtype, group=group, pipeline=args.pipeline,
                     max_memory=budget, tokenizer=False, read_threads=args.read_threads)
    text = bench_distributed(plan, args.prompt_tokens, args.gen_tokens, args.runs, dog.beat)
    dog.stop()
    if text is not None:
        print(text)
    return 0


def _rank_budget(folder, args: argparse.Namespace) -> int:
    """Each rank's budget in bytes: a size, a share of the whole model's size, or "min" (the
    least every rank's share runs in)."""
    from ..loading import describe, resolve
    from ..loading.memory import load_bytes
    from ..loading.memory_plan import minimum_budget
    from ..loading.rank_loader import rank_share
    from .bench_paging import budget_specs, share_budget

    spec = budget_specs(args.max_memory)[0]
    if isinstance(spec, int):
        return spec
    source = describe(resolve(folder))
    if isinstance(spec, float):
        return share_budget(spec, load_bytes(source, args.dtype))
    import mlx.core as mx

    size = mx.distributed.init().size()
    return max(minimum_budget(source, args.dtype, share=rank_share(source, size, r,
                                                                    args.pipeline))
               for r in range(size))
