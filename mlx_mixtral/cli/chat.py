"""`mlx-mixtral chat`: the chat app, on a model loaded here or served elsewhere."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import MlxMixtralError
from .commands import add_command
from .distributed import launched
from .drafting import add_draft_flags, add_kv_flags, draft_needs_from, drafting_from, kv_from
from .flags import add_model_flags, add_store_flags, given_sampling, sampling_from, store_settings
from .load_model import plan_for_cli


def add_chat(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "chat", run_chat)
    add_model_flags(p)
    p.add_argument("--system", default=None, help="a system prompt for new chats")
    p.add_argument("--db", default=None, help="conversation database (default: user data dir)")
    add_store_flags(p)
    p.add_argument("--prompt-cache-gb", type=float, default=None, metavar="GB",
                   help="the former name of --cache-disk, in GB (chats now keep their caches "
                   "in the prefix store)")
    add_kv_flags(p)
    add_draft_flags(p)
    p.add_argument("--server", default=None, metavar="URL",
                   help="chat with a model served over HTTP by any OpenAI-compatible server "
                   "(mlx-mixtral serve, mlx_lm.server, Ollama, llama.cpp), e.g. "
                   "http://127.0.0.1:8080; --model then names the served model (default: its "
                   "first)")
    p.add_argument("--api-key", default=None,
                   help="the server's API key (or set $MLX_MIXTRAL_API_KEY)")


def run_chat(args: argparse.Namespace) -> int:
    if launched():
        raise MlxMixtralError("the chat app does not run under mlx.launch; run `mlx.launch ... "
                              "mlx-mixtral serve` there, on a model split over the ranks, and "
                              "`mlx-mixtral chat --server URL` here")
    sampling, kv = sampling_from(args), kv_from(args)
    if args.server:  # (before the MLX engine is imported: nothing loads here)
        _refuse_store_flags(args)
        return _chat_with_server(args, sampling)
    settings = store_settings(_disk_alias(args))
    from ..loading import default_model
    from ..loading.locate import model_identity

    drafting = drafting_from(args, args.force, args.dtype)
    terminal = sys.stdin.isatty() and sys.stdout.isatty()
    name, said = args.model, []
    if name is None and terminal:
        from .first_run import needs_offer, offer_model

        name = offer_model(say=said.append) if needs_offer() else None
    name = model_identity(name or default_model())  # the demo's file is "demo", as listed
    # A missing file, an unknown repo, a model too big or a budget too small: one line now,
    # not an app that cannot load.
    draft = draft_needs_from(args, args.dtype)
    plan = plan_for_cli(name, args.force, args.dtype, max_memory=args.max_memory, draft=draft,
                        read_threads=args.read_threads)
    from ..app.chat_app import ChatApp  # (imported after the plan: they take seconds)
    from ..app.chat_prefixes import ChatPrefixes, remove_old_cache_files
    from ..app.mlx_engine import MlxEngine

    store = _open_store(args.db, terminal, 'in scripts use mlx-mixtral generate "your '
                        'prompt" (or pipe the prompt into it)')
    remove_old_cache_files(store.path.parent)
    prefixes = ChatPrefixes(store.path, settings)
    engine = MlxEngine(name, force=args.force, dtype=args.dtype, kv=kv, prefixes=prefixes,
                       drafting=drafting, max_memory=args.max_memory, plan=plan,
                       draft=draft, read_threads=args.read_threads)
    try:
        ChatApp(engine, name, store, system=args.system, settings=sampling,
                notice="\n".join(said) or None, given=given_sampling(args)).run()
    finally:
        prefixes.close()
        store.close()
    return 0


def _refuse_store_flags(args: argparse.Namespace) -> None:
    """The prefix store keeps the caches of a model run here; a server keeps its own."""
    from ..prefixes.folder import DEFAULT_BLOCK  # (MLX-free, as --server wants)

    values = (("--cache-ram", args.cache_ram), ("--cache-disk", args.cache_disk),
              ("--prompt-cache-gb", args.prompt_cache_gb))
    given = [flag for flag, value in values if value is not None]
    if args.cache_block != DEFAULT_BLOCK:
        given.insert(0, "--cache-block")
    if given:
        raise MlxMixtralError(f"{given[0]} sets the prefix store of a model run here; with "
                              "--server the server keeps its own caches (set them there)")


def _disk_alias(args: argparse.Namespace) -> argparse.Namespace:
    """--prompt-cache-gb N (the former disk budget of the per-chat cache files) is
    --cache-disk N GB."""
    gb = args.prompt_cache_gb
    if gb is None:
        return args
    if args.cache_disk is not None:
        raise MlxMixtralError("--prompt-cache-gb is the former name of --cache-disk: give one "
                              "of them")
    if not gb >= 0:
        raise MlxMixtralError(f"--prompt-cache-gb must be 0 or more, got {gb}")
    return argparse.Namespace(**{**vars(args), "cache_disk": str(int(gb * 1e9))})


def _chat_with_server(args: argparse.Namespace, sampling) -> int:
    """The app against a server: nothing loads here, the model runs there."""
    from ..app.chat_app import ChatApp
    from ..app.http_engine import HttpEngine, api_base

    url = api_base(args.server)
    store = _open_store(args.db, sys.stdin.isatty() and sys.stdout.isatty(),
                        "in scripts, call the server's API directly")
    engine = HttpEngine(url, args.api_key or os.environ.get("MLX_MIXTRAL_API_KEY"), args.model,
                        given_sampling(args))
    try:
        ChatApp(engine, args.model or url, store, system=args.system, settings=sampling).run()
    finally:
        store.close()
    return 0


def _open_store(db: str | None, terminal: bool, instead: str):
    """The conversation database for a chat that will run. A database that exists is opened
    first, so that a damaged one is refused whatever else is wrong; a new one is created only
    when the app can run: a refused run leaves no file or folder behind."""
    from pathlib import Path

    from ..app.store import Store, default_path

    path = Path(db) if db else default_path()
    store = Store(path) if path.exists() or terminal else None
    if not terminal:
        if store is not None:
            store.close()
        raise MlxMixtralError(f"the chat app needs a terminal; {instead}")
    return store
