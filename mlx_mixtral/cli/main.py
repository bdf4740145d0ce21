"""`mlx-mixtral`: the command line. Bad input ends in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import replace

from .. import __version__
from ..errors import DistributedError, MlxMixtralError
from .distributed import add_distributed_flags, launched
from .drafting import add_draft_flags, add_kv_flags, drafting_from, kv_from

EXIT_BAD_INPUT = 2
EXIT_LOST_RANK = 1  # under mlx.launch: another rank stopped


# Each command's one-line help (in `mlx-mixtral --help`) and its description.
COMMANDS = {
    "chat": (
        "chat in the terminal (the default command)",
        "Chat with a model in the terminal. Replies stream as Markdown; "
        "conversations are kept in SQLite in your user data folder ($MLX_MIXTRAL_DATA_DIR "
        "overrides it). Press F1 in the app for every key."),
    "generate": (
        "generate a reply to one prompt (streams to stdout)",
        "Generate a reply to one prompt. The reply streams to stdout; loading "
        "messages and statistics go to stderr. The model's chat format is applied unless "
        "--raw is given."),
    "convert": (
        "convert Hugging Face weights into an MLX folder (optionally quantized)",
        "Convert a Hugging Face checkpoint (safetensors) into an MLX folder, "
        "streamed shard by shard and written atomically. With -q: experts and attention at "
        "--q-bits, embeddings and output head at >= 6 bits, router gate and norms unquantized."),
    "info": (
        "architecture, size and memory needs of a model or preset",
        "Print a model's architecture, parameters (total and active per token), "
        "layers, experts, window, context, vocabulary, and a memory table for float16 and "
        "8/6/4/3 bits with whether each fits this machine."),
    "list": (
        "the models this machine has, with their sizes",
        "List the models this machine has: Hugging Face cache folders, models pulled with "
        "Ollama, converted folders and models you have opened, and the offline demo; each "
        "with its size on disk, its size once loaded, and whether it fits in the memory "
        "available now. Pass a NAME to --model."),
    "bench": (
        "measure speed and memory, side by side with mlx-lm",
        "Measure prefill and decode tokens/s, time to first token, peak memory and "
        "load time (medians over --runs). With --compare mlx-lm the same weights also run "
        "through mlx-lm, alternating with ours, and each figure gets a ratio (>1: we are "
        "better). Presets are synthetic 4-bit models of fixed shape and seed. With "
        "--max-memory (sizes, shares of the model's size, or min: min,50%%,75%%) it runs expert "
        "streaming within each budget next to the fully resident model: tok/s, hit rates per "
        "layer with and without prefetch, and bytes read per token."),
    "serve": (
        "serve the model over HTTP: OpenAI's and Ollama's APIs",
        "Serve the model over HTTP on loopback: OpenAI's API under /v1 (chat/completions, "
        "completions, models) and Ollama's under /api (chat, generate, tags, show, version), "
        "with /health. Requests queue and run one at a time; each conversation's KV cache is "
        "kept (within --prompt-cache-bytes) so its next turn prefills only what is new. "
        "response_format and Ollama's format are enforced while decoding; Mistral v3 models "
        "call tools. The sampling flags are the defaults for requests that leave them out."),
}


def _command(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    """A subcommand whose --help shows every default; it runs `_run_<name>`."""
    summary, description = COMMANDS[name]
    p = sub.add_parser(name, help=summary, description=description,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(run=globals()[f"_run_{name}"])
    return p


def _convert_parser(sub: argparse._SubParsersAction) -> None:
    from ..convert.plan import Q_BITS, Q_GROUP_SIZES, RECIPES

    p = _command(sub, "convert")
    p.add_argument("--hf-path", required=True, help="source folder (config.json + safetensors)")
    p.add_argument("--mlx-path", required=True, help="output folder (must not exist)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    p.add_argument("--q-bits", type=int, choices=Q_BITS, default=4,
                   help="bits per weight (attention; the experts too unless --expert-bits)")
    p.add_argument("--expert-bits", type=int, choices=Q_BITS, default=None,
                   help="bits per weight of the experts (of the MLP in a dense model); "
                   "implies -q")
    recipes = "; ".join(f"{k}: experts {e}-bit, attention {a}-bit"
                        for k, (e, a) in RECIPES.items())
    p.add_argument("--recipe", default=None,
                   help=f"named mixed precision, implies -q ({recipes}). Embeddings and head "
                   "stay at >= 6 bits, the router unquantized")
    p.add_argument("--q-group-size", type=int, choices=Q_GROUP_SIZES, default=64,
                   help="weights per quantization group")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="dtype of unquantized tensors and scales (default: the source's)")
    p.add_argument("--dequantize", action="store_true",
                   help="turn a quantized MLX folder back into floats")
    p.add_argument("--shard-size-gb", type=float, default=5.0, help="maximum shard size in GB")
    p.add_argument("--force", action="store_true", help="replace an existing --mlx-path")
    p.add_argument("--verify", action="store_true",
                   help="afterwards, compare source and output on a fixed text (loads both)")


def _run_convert(args: argparse.Namespace) -> int:
    from ..convert import convert

    summary = convert(
        args.hf_path, args.mlx_path, quantize=args.quantize, q_bits=args.q_bits,
        q_group_size=args.q_group_size, expert_bits=args.expert_bits, recipe=args.recipe,
        dtype=args.dtype, dequantize=args.dequantize,
        force=args.force, shard_bytes=int(args.shard_size_gb * 1e9),
    )
    print(summary)
    from ..loading.catalog import remember

    remember(args.mlx_path)  # offered again by `list` and the app's model picker
    if args.verify:
        from ..convert.verify import verify

        print(verify(args.hf_path, args.mlx_path))
    return 0


MODEL_HELP = ("a model folder, a .gguf file, a Hugging Face repo id, or ollama:NAME[:TAG] "
              "(default: $MLX_MIXTRAL_MODEL, then \"model\" in the user config file, then the "
              "offline demo model SmolLM2-135M-Instruct)")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    from ..generation.sampling import SamplingParams

    d = SamplingParams()
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="longest reply")
    p.add_argument("--temp", "--temperature", dest="temp", type=float, default=d.temperature,
                   help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling (1 = off)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="keep the k likeliest (0 = off)")
    p.add_argument("--min-p", type=float, default=d.min_p,
                   help="drop tokens below this share of the top one (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help="> 1 discourages repeats (1 = off)")
    p.add_argument("--repetition-context", type=int, default=d.repetition_context,
                   help="how many recent tokens the penalty looks at")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")


# A setting's name in the API -> its flag, so that errors speak the user's language.
FLAGS = {"temperature": "--temp", "top_p": "--top-p", "top_k": "--top-k", "min_p": "--min-p",
         "repetition_penalty": "--repetition-penalty",
         "repetition_context": "--repetition-context", "max_tokens": "--max-tokens",
         "seed": "--seed"}


def sampling_from(args: argparse.Namespace):
    from ..errors import SamplingError
    from ..generation.sampling import SamplingParams

    try:
        return SamplingParams(
            temperature=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            repetition_context=args.repetition_context, max_tokens=args.max_tokens,
            seed=args.seed)
    except SamplingError as e:
        message = str(e)
        for name, flag in FLAGS.items():
            message = re.sub(rf"\b{name}\b", flag, message)
        raise SamplingError(message) from None


FORCE_HELP = "load the model even if it looks too big for the available memory"
DTYPE_CHOICES = ["float32", "float16", "bfloat16"]
DTYPE_HELP = ("compute in this dtype (default: float32 on the CPU backend, the checkpoint's own "
              "on Metal)")


MAX_MEMORY_HELP = ("run within this much memory, e.g. 12GB: a Mixtral larger than that keeps "
                   "some experts per layer in memory and reads the others from disk when "
                   "chosen (MLX or Hugging Face safetensors folders); one line at load states "
                   "the plan (default: no budget, the whole model loads)")


def add_model_flags(p: argparse.ArgumentParser, model: bool = True,
                    sampling: bool = True) -> None:
    """--model, --force, --dtype and --max-memory, and the sampling flags, for the commands
    that load a model."""
    if model:
        p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help=DTYPE_HELP)
    p.add_argument("--max-memory", default=None, metavar="SIZE", help=MAX_MEMORY_HELP)
    if sampling:
        add_sampling_flags(p)


def check_budget(name: str, max_memory: str | None, force: bool, dtype: str | None):
    """The model's memory plan within --max-memory, or None when it loads whole: a budget too
    small, or a model too big even to stream, ends in one line before anything loads. Without
    --max-memory, a Mixtral larger than the available memory streams its experts within it."""
    from ..loading import describe, resolve
    from ..loading.loader import budget_bytes
    from ..loading.memory_plan import automatic_plan, plan_memory
    from ..units import size

    source = describe(resolve(name))
    if max_memory is not None:
        return plan_memory(source, budget_bytes(max_memory), dtype)
    plan = automatic_plan(source, force, dtype)
    if plan is not None:
        print(f"{source.path.name} is larger than the {size(plan.budget)} of memory available: "
              "its experts will be read from disk as chosen (--max-memory sets the budget, "
              "--force loads it whole)", file=sys.stderr, flush=True)
    return plan


def load_model_for_cli(name: str | None, force: bool = False, dtype: str | None = None,
                       group=None, pipeline: bool = False, max_memory: str | None = None):
    """Load the named (or default) model, saying what is happening on stderr (split over the
    ranks of `group` under mlx.launch; rank 0 speaks for all)."""
    from ..loading import default_model, load

    name = name or default_model()
    if group is not None:  # a world the model cannot be split into: one line, nothing read
        from ..loading import describe, resolve
        from ..model.sharding import check_world

        check_world(describe(resolve(name)).args, group.size(), pipeline)
    else:  # a budget that is not a size or too small, a model too big: one line
        plan = check_budget(name, max_memory, force, dtype)
        max_memory = plan and plan.budget
    if group is None or group.rank() == 0:
        split = "" if group is None else (
            f" over {group.size()} ranks ({'pipeline' if pipeline else 'tensor parallel'})")
        print(f"Loading {name}{split} ...", file=sys.stderr, flush=True)
    model, tokenizer = load(name, force=force, dtype=dtype, group=group, pipeline=pipeline,
                            max_memory=max_memory)
    if model.memory_plan is not None:
        print(model.memory_plan, file=sys.stderr, flush=True)
    return model, tokenizer


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "generate")
    add_model_flags(p)
    p.add_argument("text", nargs="?", default=None, metavar="PROMPT",
                   help="the prompt (or --prompt; read from stdin when neither is given and "
                   "stdin is not a terminal)")
    p.add_argument("--prompt", default=None, help="the prompt (use - to read stdin)")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, no chat format")
    p.add_argument("--chat-format", default=None,
                   choices=["mistral-v1", "mistral-v3", "template", "plain"],
                   help="override the chat format detected from the tokenizer")
    p.add_argument("--prompt-cache", default=None, metavar="FILE",
                   help="reuse the KV cache in FILE where it matches the prompt's beginning "
                   "(a long system prompt or document is then prefilled once), and save it "
                   "there afterwards")
    add_kv_flags(p)
    add_draft_flags(p)
    add_distributed_flags(p)


def read_prompt(arg: str) -> str:
    """The prompt from the command line or stdin (-); bytes that are not UTF-8 become U+FFFD,
    with a warning, instead of a decoding traceback."""
    raw = sys.stdin.buffer.read() if arg == "-" else os.fsencode(arg)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        print("mlx-mixtral: warning: the prompt has bytes that are not UTF-8; they were "
              "replaced by U+FFFD", file=sys.stderr)
        return raw.decode("utf-8", "replace")


def _run_generate(args: argparse.Namespace) -> int:
    from ..generation import Stats, stream_generate
    from ..generation.stream import prompt_ids, require_text

    sampling, kv = sampling_from(args), kv_from(args)  # validate before the slow load
    drafting = drafting_from(args, args.force, args.dtype)
    given = _prompt_argument(args)  # the same argv on every rank: the same answer
    group = dog = None
    if launched():
        if drafting or args.prompt_cache:
            raise MlxMixtralError("drafted decoding and --prompt-cache do not run under "
                                  "mlx.launch; leave them out")
        from ..generation.lockstep import share_seed, share_text
        from .distributed import join, quiet_unless_first

        group, dog = join(args.dist_timeout)
        dog.beat()
        first = group.rank() == 0
        prompt = share_text(read_prompt(given) if first else None, group)
        sampling = replace(sampling, seed=share_seed(sampling.seed, group))
        dog.stop()
        quiet_unless_first(group)
    else:
        prompt = read_prompt(given)
    require_text(prompt)  # before the slow load
    model, tokenizer = load_model_for_cli(args.model, args.force, args.dtype, group,
                                          args.pipeline, args.max_memory)
    draft = drafting(model, tokenizer) if drafting else None
    if dog is not None:
        import mlx.core as mx

        mx.eval(model.parameters())  # every rank reads its part before the clock starts
        dog.beat()
    ids = prompt_ids(tokenizer, prompt, system=args.system, raw=args.raw,
                     chat_format=args.chat_format)
    cache, done = _reused_cache(args.prompt_cache, model, ids, draft.k if draft else 0)
    stats, printed = None, ""
    beat = (lambda *_: dog.beat()) if dog is not None else None
    try:
        for item in stream_generate(model, tokenizer, ids[done:], sampling=sampling,
                                    cache=cache, kv=kv, draft=draft, progress=beat):
            if beat is not None:
                beat()
            if isinstance(item, Stats):
                stats = item
                print(file=sys.stdout, flush=True)
                if group is None or group.rank() == 0:
                    print(item, file=sys.stderr)
            else:
                print(item.text, end="", flush=True)
                printed = (printed + item.text)[-1:]
    except KeyboardInterrupt:
        if printed and printed != "\n":
            print(flush=True)  # end the reply's line: "interrupted" goes on its own
        raise
    except RuntimeError as e:
        if group is None:
            raise
        from .distributed import lost

        raise lost(e, group) from None
    if args.prompt_cache and stats is not None:
        from ..loading.prompt_cache import save_prompt_cache

        held = (ids + stats.tokens)[:cache[0].offset]
        save_prompt_cache(args.prompt_cache, cache, model=model, tokens=held)
    return 0


def _prompt_argument(args: argparse.Namespace) -> str:
    """The prompt as given: positional, --prompt, or "-" (stdin) when piped."""
    if args.text is not None and args.prompt is not None:
        raise MlxMixtralError("give the prompt once: as an argument or with --prompt")
    given = args.text if args.text is not None else args.prompt
    if given is not None:
        return given
    if not sys.stdin.isatty():
        return "-"
    raise MlxMixtralError('no prompt: mlx-mixtral generate "your prompt" (or --prompt, or '
                          "pipe it in)")


def _reused_cache(path: str | None, model, ids: list[int], slack: int) -> tuple[list, int]:
    """(cache, n): the saved cache in `path` trimmed to the n first prompt tokens it shares
    with `ids`, or a new cache and 0."""
    from pathlib import Path

    from ..generation.prefix import reuse_prefix

    def fresh() -> list:
        return model.make_cache(slack=slack)

    if not path or not Path(path).is_file():
        return fresh(), 0
    from ..loading.prompt_cache import load_prompt_cache

    cache, meta = load_prompt_cache(path, return_metadata=True, model=model)
    if any(getattr(c, "slack", slack) < slack for c in cache):
        return fresh(), 0  # too little room for rejected drafts: start over
    cache, done = reuse_prefix(cache, meta["tokens"], ids, fresh)
    print(f"Prompt cache: {done} of {len(ids)} prompt tokens reused", file=sys.stderr)
    return cache, done


def _chat_parser(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "chat")
    add_model_flags(p)
    p.add_argument("--system", default=None, help="a system prompt for new chats")
    p.add_argument("--db", default=None, help="conversation database (default: user data dir)")
    p.add_argument("--prompt-cache-gb", type=float, default=2.0,
                   help="disk budget for the saved KV caches of conversations (0 = none)")
    add_kv_flags(p)
    add_draft_flags(p)
    p.add_argument("--server", default=None, metavar="URL",
                   help="chat with a model served over HTTP by any OpenAI-compatible server "
                   "(mlx-mixtral serve, mlx_lm.server, Ollama, llama.cpp), e.g. "
                   "http://127.0.0.1:8080; --model then names the served model (default: its "
                   "first)")
    p.add_argument("--api-key", default=None,
                   help="the server's API key (or set $MLX_MIXTRAL_API_KEY)")


def _run_chat(args: argparse.Namespace) -> int:
    if launched():
        raise MlxMixtralError("the chat app does not run under mlx.launch; run `mlx.launch ... "
                              "mlx-mixtral serve` there, on a model split over the ranks, and "
                              "`mlx-mixtral chat --server URL` here")
    sampling, kv = sampling_from(args), kv_from(args)
    if args.server:  # (before the MLX engine is imported: nothing loads here)
        return _chat_with_server(args, sampling)
    from ..app.chat_app import ChatApp
    from ..app.mlx_engine import MlxEngine
    from ..app.prompt_caches import PromptCaches
    from ..app.store import Store
    from ..loading import default_model

    drafting = drafting_from(args, args.force, args.dtype)
    terminal = sys.stdin.isatty() and sys.stdout.isatty()
    name = args.model
    if name is None and terminal:
        from .first_run import needs_offer, offer_model

        name = offer_model() if needs_offer() else None
    name = name or default_model()
    # A missing file, an unknown repo, a model too big or a budget too small: one line now,
    # not an app that cannot load.
    plan = check_budget(name, args.max_memory, args.force, args.dtype)
    store = Store(args.db)
    if not terminal:
        store.close()
        raise MlxMixtralError("the chat app needs a terminal; in scripts use mlx-mixtral "
                              'generate "your prompt" (or pipe the prompt into it)')
    caches = None
    if args.prompt_cache_gb > 0:
        caches = PromptCaches(store.path.parent / "prompt-caches", int(args.prompt_cache_gb * 1e9))
    engine = MlxEngine(name, force=args.force, dtype=args.dtype, kv=kv, caches=caches,
                       drafting=drafting, max_memory=plan and plan.budget)
    try:
        ChatApp(engine, name, store, system=args.system, settings=sampling).run()
    finally:
        store.close()
    return 0


def _chat_with_server(args: argparse.Namespace, sampling) -> int:
    """The app against a server: nothing loads here, the model runs there."""
    from ..app.chat_app import ChatApp
    from ..app.http_engine import HttpEngine, api_base
    from ..app.store import Store

    url = api_base(args.server)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise MlxMixtralError("the chat app needs a terminal; in scripts, call the server's "
                              "API directly")
    engine = HttpEngine(url, args.api_key or os.environ.get("MLX_MIXTRAL_API_KEY"), args.model)
    store = Store(args.db)
    try:
        ChatApp(engine, args.model or url, store, system=args.system, settings=sampling).run()
    finally:
        store.close()
    return 0


def _model_or_preset(p: argparse.ArgumentParser, model_help: str, presets: dict,
                     preset_help: str) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--model", default=None, help=model_help)
    group.add_argument("--preset", choices=sorted(presets), default=None, help=preset_help)


def _info_parser(sub: argparse._SubParsersAction) -> None:
    from ..model.config import PRESETS

    p = _command(sub, "info")
    _model_or_preset(p, MODEL_HELP, PRESETS, "a released model's shape, no weights needed")
    p.add_argument("--ranks", type=int, default=1,
                   help="also show the memory each of this many ranks needs (mlx.launch)")
    p.add_argument("--memory", default=None, metavar="SIZE",
                   help="plan for this much memory, e.g. 16GB: for each precision, whether "
                   "the model is resident, streams its experts (how many per layer stay in "
                   "memory, bytes read per token) or does not fit (default: this machine)")


def _run_info(args: argparse.Namespace) -> int:
    from .info import info

    if args.ranks < 1:
        raise MlxMixtralError("--ranks must be >= 1")
    memory = None
    if args.memory is not None:
        from ..loading.loader import budget_bytes

        memory = budget_bytes(args.memory)
    print(info(args.model, args.preset, args.ranks, memory))
    return 0


def _list_parser(sub: argparse._SubParsersAction) -> None:
    _command(sub, "list")


def _run_list(args: argparse.Namespace) -> int:
    from .listing import list_main

    print(list_main())
    return 0


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    from .bench import PRESETS as BENCH_PRESETS

    p = _command(sub, "bench")
    _model_or_preset(p, "an MLX or Hugging Face model folder", BENCH_PRESETS,
                     "a synthetic model (built and cached on first use)")
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompt length")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens generated per run")
    p.add_argument("--runs", type=int, default=3, help="runs per engine (medians reported)")
    p.add_argument("--compare", choices=["mlx-lm"], default=None, help="run a peer too")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_model_flags(p, model=False, sampling=False)
    add_kv_flags(p)
    add_draft_flags(p)
    add_distributed_flags(p)


def _run_bench(args: argparse.Namespace) -> int:
    from .bench import bench_main

    if args.prompt_tokens < 1 or args.gen_tokens < 2 or args.runs < 1:
        raise MlxMixtralError("--prompt-tokens and --runs must be >= 1, --gen-tokens >= 2")
    if not args.model and not args.preset:
        args.preset = "mixtral-tiny"
    drafting, kv = drafting_from(args, args.force, args.dtype), kv_from(args)
    if launched():
        return _bench_launched(args, drafting, kv)
    if args.max_memory:
        return _bench_streaming(args, drafting, kv)
    if kv.bits is not None and args.compare:
        raise MlxMixtralError("--kv-bits with --compare mlx-lm: mlx-lm cannot quantize a "
                              "rolling cache; compare without --kv-bits")
    print(bench_main(args.model, args.preset, args.prompt_tokens, args.gen_tokens, args.runs,
                     args.compare == "mlx-lm", args.json, args.force, args.dtype, drafting,
                     kv))
    return 0


def _bench_streaming(args: argparse.Namespace, drafting, kv) -> int:
    from .bench import preset_folder
    from .bench_streaming import bench_streaming

    if args.compare or drafting or kv.bits is not None:
        raise MlxMixtralError("bench --max-memory compares streaming with our own resident "
                              "run: leave out --compare, drafting and --kv-bits")
    folder = preset_folder(args.preset) if args.preset else _bench_folder(args.model)
    print(bench_streaming(folder, args.max_memory, args.prompt_tokens, args.gen_tokens,
                          args.runs, args.dtype, args.json))
    return 0


def _bench_folder(name: str):
    from pathlib import Path

    from ..errors import WeightsError
    from ..loading import resolve

    folder = resolve(name)
    if not Path(folder).is_dir():
        raise WeightsError(f"{folder}: bench needs an MLX or Hugging Face folder; convert "
                           "it first")
    return folder


def _bench_launched(args: argparse.Namespace, drafting, kv) -> int:
    """bench under mlx.launch: the model split over the ranks, rank 0 reports."""
    import mlx.core as mx

    from ..loading import describe, resolve
    from ..model.sharding import check_world
    from .bench import bench_distributed, preset_folder
    from .distributed import join

    if args.compare or drafting or kv.bits is not None:
        raise MlxMixtralError("under mlx.launch, bench runs our engine alone: leave out "
                              "--compare, drafting and --kv-bits")
    group, dog = join(args.dist_timeout)
    if args.preset and group.rank() == 0:
        preset_folder(args.preset)  # built once, by rank 0, before the others look
    mx.eval(mx.distributed.all_sum(mx.array(1), group=group))
    folder = preset_folder(args.preset) if args.preset else resolve(args.model)
    check_world(describe(folder).args, group.size(), args.pipeline)
    text = bench_distributed(folder, group, args.pipeline, args.prompt_tokens, args.gen_tokens,
                             args.runs, args.dtype, dog.beat)
    dog.stop()
    if text is not None:
        print(text)
    return 0


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    from .serve import add_serve_flags

    p = _command(sub, "serve")
    add_model_flags(p)
    add_kv_flags(p)
    add_serve_flags(p)
    add_distributed_flags(p)


def _run_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    sampling, kv = sampling_from(args), kv_from(args)  # validate before the slow load
    group = lockstep = None
    if launched():  # rank 0 serves HTTP, the other ranks follow its jobs
        from ..generation.lockstep import Lockstep
        from .distributed import join

        group, dog = join(args.dist_timeout)
        dog.stop()  # loading takes what it takes; the jobs arm it again
        lockstep = Lockstep(group, busy=dog.beat, idle=dog.stop)

    def load(name: str) -> tuple:
        return load_model_for_cli(name, args.force, args.dtype, group, args.pipeline,
                                  args.max_memory)

    try:
        return serve(args, load, sampling, kv, lockstep)
    except MlxMixtralError:
        raise
    except Exception as e:
        if group is None:
            raise
        from .distributed import lost

        raise lost(e, group) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-mixtral",
        description="Run Mistral and Mixtral models locally on MLX.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mlx-mixtral {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _chat_parser(sub)
    _generate_parser(sub)
    _convert_parser(sub)
    _info_parser(sub)
    _list_parser(sub)
    _bench_parser(sub)
    _serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help", "--version"):
        argv = ["chat", *argv]  # no command: chat, the main job (`mlx-mixtral --model M`)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except MlxMixtralError as e:
        message = " ".join(str(e).split("\n"))  # one line, whatever a library put in it
        print(f"mlx-mixtral: error: {message}", file=sys.stderr, flush=True)
        return EXIT_LOST_RANK if isinstance(e, DistributedError) else EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("mlx-mixtral: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
