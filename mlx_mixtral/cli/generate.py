"""`mlx-mixtral generate`: one prompt, the reply streamed to stdout."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from ..errors import MlxMixtralError
from .commands import add_command
from .distributed import add_distributed_flags, launched
from .drafting import add_draft_flags, add_kv_flags, draft_needs_from, drafting_from, kv_from
from .flags import add_model_flags, add_store_flags, given_sampling, sampling_from, store_settings
from .load_model import load_from_plan, plan_for_cli


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "generate", run_generate)
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
                   "there afterwards: one file of your own, used instead of the prefix store")
    p.add_argument("--no-prompt-cache", action="store_true",
                   help="do not use the prefix store. By default a chat prompt's beginning "
                   "is taken from the blocks of keys and values earlier runs kept (in the data "
                   "folder; `mlx-mixtral cache` shows and clears them), and the prompt's blocks "
                   "are kept for the next run. The store is not used with --raw, "
                   "--prompt-cache FILE, under mlx.launch, nor for drafted decoding with "
                   "--kv-bits")
    add_store_flags(p, one_prompt=True)
    add_kv_flags(p)
    add_draft_flags(p)
    add_distributed_flags(p)


def read_prompt(arg: str) -> str:
    """The prompt from the command line or stdin (-); bytes that are not UTF-8 become U+FFFD,
    with a warning, instead of a decoding traceback. From stdin, one trailing newline (\\n or
    \\r\\n) goes: `echo "..." |` adds it, and the prompt as an argument has none."""
    if arg == "-":
        raw = sys.stdin.buffer.read()
        raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw
    else:
        raw = os.fsencode(arg)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        print("mlx-mixtral: warning: the prompt has bytes that are not UTF-8; they were "
              "replaced by U+FFFD", file=sys.stderr)
        return raw.decode("utf-8", "replace")


def run_generate(args: argparse.Namespace) -> int:
    sampling, kv = sampling_from(args), kv_from(args)  # validate before the slow load
    drafting = drafting_from(args, args.force, args.dtype)
    store_use = _store_use(args, drafting is not None, kv.bits)
    if args.prompt_cache:
        _check_prompt_cache_path(args.prompt_cache)  # before the slow load
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
    # A model that cannot load is one line before the seconds of importing generation.
    plan = plan_for_cli(args.model, args.force, args.dtype, group, args.pipeline,
                        args.max_memory, read_threads=args.read_threads,
                        draft=draft_needs_from(args, args.dtype))
    from ..generation import Stats, stream_generate
    from ..generation.sampling import model_defaults
    from ..generation.stream import prompt_ids, require_text

    require_text(prompt)  # before the slow load
    model, tokenizer = load_from_plan(plan)
    draft = drafting(model, tokenizer) if drafting else None
    sampling = model_defaults(model).apply(sampling, given_sampling(args))  # where no flag
    if dog is not None:
        import mlx.core as mx

        mx.eval(model.parameters())  # every rank reads its part before the clock starts
        dog.beat()
    ids = prompt_ids(tokenizer, prompt, system=args.system, raw=args.raw,
                     chat_format=args.chat_format)
    slack = draft.k if draft else 0
    store = None
    if store_use is not None:
        from .stored_prefix import start_from_store

        store, cache, done = start_from_store(model, store_use, plan.name, ids, kv, slack)
    else:
        cache, done = _reused_cache(args.prompt_cache, model, ids, slack)
    stats, printed = None, ""
    beat = (lambda *_: dog.beat()) if dog is not None else None
    progress = beat
    if store is not None:
        from .stored_prefix import giver

        progress = giver(store, ids, cache)  # (no mlx.launch with the store: no dog to beat)
    try:
        for item in stream_generate(model, tokenizer, ids[done:], sampling=sampling,
                                    cache=cache, history=ids[:done], kv=kv, draft=draft,
                                    progress=progress):
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
    if store is not None and stats is not None:
        store.give(ids, cache)  # the prompt's blocks (a reply is not the next prompt's start)
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


def _store_use(args: argparse.Namespace, drafted: bool, kv_bits: int | None):
    """The prefix store's settings when this run uses it, else None (its flags are checked
    either way, before the slow load)."""
    if args.no_prompt_cache and args.prompt_cache:
        raise MlxMixtralError("--prompt-cache FILE and --no-prompt-cache exclude each other: "
                              "--prompt-cache already leaves the prefix store out")
    settings = store_settings(args)
    off = (args.no_prompt_cache or args.prompt_cache or args.raw or launched()
           or (drafted and kv_bits is not None))
    return None if off else settings


def _check_prompt_cache_path(path: str) -> None:
    from pathlib import Path

    from ..loading.prompt_cache import refuse_folder

    try:
        refuse_folder(Path(path))
    except MlxMixtralError as e:
        raise MlxMixtralError(f"--prompt-cache {e}") from None


def _reused_cache(path: str | None, model, ids: list[int], slack: int) -> tuple[list, int]:
    """(cache, n): the saved cache in `path` trimmed to the n first prompt tokens it shares
    with `ids`, or a new cache and 0."""
    from pathlib import Path

    from ..generation.prefix import reuse_prefix

    def fresh() -> list:
        return model.make_cache(slack=slack)

    if not path or not Path(path).is_file():
        return fresh(), 0
    from ..errors import PromptCacheError
    from ..loading.prompt_cache import load_prompt_cache

    cache, meta = load_prompt_cache(path, return_metadata=True, model=model)
    if meta["tokens"] is None:
        raise PromptCacheError(f"{path}: this prompt cache was saved without the tokens it "
                               "holds (save_prompt_cache(path, cache, tokens=...) records them), "
                               "so no prompt can continue it; delete it or pass another "
                               "--prompt-cache file")
    if any(getattr(c, "slack", slack) < slack for c in cache):
        return fresh(), 0  # too little room for rejected drafts: start over
    cache, done = reuse_prefix(cache, meta["tokens"], ids, fresh)
    print(f"Prompt cache: {done} of {len(ids)} prompt tokens reused", file=sys.stderr)
    return cache, done
