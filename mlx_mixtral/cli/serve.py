"""`mlx-mixtral serve`: the model behind OpenAI's and Ollama's HTTP APIs (uvicorn)."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MlxMixtralError
from .commands import add_command
from .distributed import add_distributed_flags, launched
from .drafting import add_kv_flags, kv_from
from .flags import (
    add_model_flags,
    add_store_flags,
    given_sampling,
    sampling_from,
    size_flag,
    store_settings,
)
from .load_model import load_from_plan, plan_for_cli

if TYPE_CHECKING:
    from ..loading.load_plan import LoadPlan

DEFAULT_PORT = 8080
DEFAULT_MAX_QUEUE = 32


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    from ..model.limits import DECODE_CONCURRENCY
    from ..server import DEFAULT_MAX_BODY

    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 opens it to your network: set "
                   "--api-key then)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every request but /health "
                   "(or set $MLX_MIXTRAL_API_KEY)")
    p.add_argument("--model-id", default=None,
                   help="the model's name in the API (default: the folder or file name)")
    p.add_argument("--prompt-cache-bytes", default=None, metavar="SIZE",
                   help="the old name of --cache-ram (the same flag; give one of them). "
                   "Within --max-memory the memory tier has at most half the room the model "
                   "leaves by default, and a size that does not fit is refused. Under "
                   "mlx.launch prompts are kept in memory only, as whole caches within this "
                   "size (the ranks must agree on what they reuse), and --cache-disk and "
                   "--cache-block are refused")
    p.add_argument("--response-store-bytes", default="64MB", metavar="SIZE",
                   help="Responses API replies kept for previous_response_id; least recently "
                   "used go first")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests waiting or running at most; more get 503")
    p.add_argument("--decode-concurrency", type=int, default=DECODE_CONCURRENCY, metavar="N",
                   help="requests generating together (continuous batching); more wait in "
                   "the queue")
    p.add_argument("--prefill-step", type=int, default=None, metavar="TOKENS",
                   help="prompt tokens per forward pass: a long prompt is prefilled in chunks "
                   "of this size between the running requests' tokens (default 512; less "
                   "within a memory budget)")
    p.add_argument("--max-body", default=f"{DEFAULT_MAX_BODY // 2**20}MiB", metavar="SIZE",
                   help="largest request body accepted; larger get 413")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (repeat for more); CORS is off "
                   "without it")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="what the server logs to stderr")


def ram_wanted(args: argparse.Namespace) -> tuple[int, bool, str]:
    """(bytes for kept prompts in memory, whether they may shrink to fit a memory budget: they
    may unless the user gave them, the parameter that named them)."""
    from ..prefixes.settings import default_ram

    given = [(flag, param) for flag, param in (("--cache-ram", "cache_ram"),
                                               ("--prompt-cache-bytes", "prompt_cache_bytes"))
             if getattr(args, param) is not None]
    if not given:
        return default_ram(), True, "cache_ram"
    sizes = {size_flag(getattr(args, param), flag) for flag, param in given}
    if len(sizes) > 1:
        raise MlxMixtralError("--cache-ram and --prompt-cache-bytes are one setting (the second "
                              "is its old name); give one of them")
    return sizes.pop(), False, given[0][1]


def store_wanted(args: argparse.Namespace, launched_here: bool):
    """The prefix store's settings (its RAM tier sized again by `serve`, within the plan), or
    None under mlx.launch, where the ranks keep whole caches in a pool (refused: the flags
    that only a store would use)."""
    from ..prefixes.store import DEFAULT_BLOCK

    if launched_here:
        for flag, given in (("--cache-disk", args.cache_disk is not None),
                            ("--cache-block", args.cache_block != DEFAULT_BLOCK)):
            if given:
                raise MlxMixtralError(f"{flag}: under mlx.launch prompts are kept in memory "
                                      "only (the ranks must agree on what they reuse); leave "
                                      f"{flag} out")
        return None
    return store_settings(args)


def model_name(given: str | None, name: str) -> str:
    """The model's id in the API: what the user typed if it is a name (a repo id, "demo",
    ollama:...), else the folder's or file's name ("demo" for the offline demo)."""
    from ..demo import demo_model_path

    if given is None and name == str(demo_model_path()):
        return "demo"
    if given and not Path(given).expanduser().exists():
        return given
    path = Path(name)
    return path.stem if path.suffix == ".gguf" else path.name or name


def _worker(args: argparse.Namespace, plan: LoadPlan, kv, lockstep=None, settings=None):
    """The worker that loads `plan`'s model on its thread and runs its jobs, its prompts kept
    in the prefix store `settings` describe (its RAM tier sized here), or under a `lockstep`
    in a pool."""
    import os
    import signal
    from dataclasses import replace
    from functools import partial

    from ..prefixes.settings import open_store
    from ..server.cache_pool import CachePool, cache_bytes
    from ..server.worker import Worker

    # Within a budget the kept prompts have the share the plan carved out for them, and MLX's
    # buffer cache keeps no more than the running requests may use.
    ram = plan.memory.reserved if plan.memory is not None else ram_wanted(args)[0]
    if plan.memory is not None:
        import mlx.core as mx

        mx.set_cache_limit(plan.memory.cache_limit)
    pool = store = None
    if lockstep is not None:
        pool = CachePool(ram, lambda cache: lockstep.largest(cache_bytes(cache)))
    elif settings is not None:
        settings = replace(settings, ram=ram)
        if settings.ram or settings.disk != 0:  # (both 0: no prompt is kept)
            store = partial(open_store, settings=settings, name=plan.name)
    return Worker(lambda: load_from_plan(plan), pool, args.max_queue, kv, lockstep,
                  on_lost=lambda: os.kill(os.getpid(), signal.SIGINT),  # uvicorn stops
                  capacity=args.decode_concurrency, prefill_step=args.prefill_step,
                  store=store)


def _service(args: argparse.Namespace, plan: LoadPlan, sampling, worker, model_id: str):
    """The loaded model's service: its API name and defaults (a request's unset fields take
    the flags given, then the model's own defaults)."""
    from ..catalog.summary import summarize
    from ..generation.sampling import model_defaults
    from ..server.service import Service

    model, tokenizer = worker.ready()
    defaults = model_defaults(model).apply(sampling, given_sampling(args))
    return Service(model, tokenizer, model_id, worker, defaults,
                   summary=summarize(plan.source))  # (what Ollama's model list says)


def _loader(args: argparse.Namespace, plan: LoadPlan, sampling, kv, model_id: str,
            settings=None):
    """Loads another model when a request names it (on the registry's thread)."""

    def load():
        worker = _worker(args, plan, kv, settings=settings)
        try:
            return _service(args, plan, sampling, worker, model_id)
        except BaseException:
            worker.stop()
            raise

    return load


def serve(args: argparse.Namespace, plan: LoadPlan, sampling, kv, lockstep=None,
          settings=None, others: list[tuple[str, LoadPlan]] | None = None) -> int:
    """Serve until stopped, prompts kept in the prefix store `settings` describe. With a
    `lockstep` (the model split over ranks by mlx.launch), rank 0 serves HTTP and the other
    ranks run its jobs alongside, prompts kept in a pool; a lost rank stops them all.
    `others`: further models (name, plan) loaded when a request names them."""
    import os

    from ..server.http_app import Guards, create_app
    from ..server.http_server import run_http

    max_body = size_flag(args.max_body, "--max-body")
    store_bytes = size_flag(args.response_store_bytes, "--response-store-bytes")
    for flag, value in (("--max-queue", args.max_queue),
                        ("--decode-concurrency", args.decode_concurrency),
                        ("--prefill-step", 1 if args.prefill_step is None else args.prefill_step)):
        if value < 1:
            raise MlxMixtralError(f"{flag} must be at least 1")
    api_key = args.api_key or os.environ.get("MLX_MIXTRAL_API_KEY") or None
    model_id = args.model_id or model_name(args.model[0] if args.model else None, plan.name)
    pins, keep = _registry_flags(args, [model_id, *(n for n, _ in others)])  # (also for one)
    models = _registry(args, plan, sampling, kv, model_id, others, pins, keep, settings) \
        if others else None
    worker = _worker(args, plan, kv, lockstep, settings)
    try:
        worker.ready()
    except KeyboardInterrupt:  # stopped while loading: MLX is busy on the worker's thread
        sys.stderr.flush()
        os._exit(130)  # (ending the interpreter around that thread could abort the process)
    if lockstep is not None and not lockstep.leader:
        worker.thread.join()  # runs rank 0's jobs until rank 0 stops
        return _ended(worker)
    service = _service(args, plan, sampling, worker, model_id)
    if models is not None:
        models.adopt(model_id, service)
    app = create_app(service, Guards(api_key, max_body, tuple(args.cors_origin)),
                     store_bytes, models)
    where = f"http://{args.host}:{args.port}"
    also = f" (and {', '.join(n for n, _ in others)} on request)" if others else ""
    print(f"Serving {model_id}{also} at {where}/v1 (OpenAI) and {where}/api (Ollama)"
          + (", API key required" if api_key else ""), file=sys.stderr, flush=True)

    def halt() -> None:
        for s in models.services() if models is not None else [service]:
            s.worker.halt()

    try:
        run_http(app, args.host, args.port, args.log_level, on_stop=halt)
    finally:
        if models is not None:
            models.close()
            for s in models.services():
                if s is not service:
                    s.worker.stop()
        if worker.lost is None:
            worker.stop()  # (the other ranks hear that there is no more work)
    return _ended(worker)


def _registry_flags(args: argparse.Namespace, names: list[str]) -> tuple[set[str], object]:
    """(pinned names, keep-alive seconds or "default") from --pin, --max-models and
    --keep-alive, checked against the served `names` before anything loads."""
    from ..server.models import keep_alive_seconds
    from ..server.service import APIError

    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise MlxMixtralError(f"--model: two models are named {duplicated[0]!r}; give each "
                              "model once (a folder's name is its name in the API)")
    pins = set(args.pin or [])
    unknown = sorted(pins - set(names))
    if unknown:
        raise MlxMixtralError(f"--pin {unknown[0]}: not one of the served models "
                              f"({', '.join(names)})")
    if args.max_models < 1:
        raise MlxMixtralError("--max-models must be at least 1")
    try:
        keep = keep_alive_seconds(args.keep_alive)
    except APIError as e:
        raise MlxMixtralError(f"--keep-alive: {e.message.split(': ', 1)[1]}") from None
    return pins, keep


def _registry(args: argparse.Namespace, plan: LoadPlan, sampling, kv, model_id: str,
              others: list[tuple[str, LoadPlan]], pins: set[str], keep: object, settings=None):
    """The models this server answers for: the first (loaded now) and `others`."""
    from ..catalog.summary import summarize
    from ..server.models import Entry, Models

    entries = [Entry(model_id, _loader(args, plan, sampling, kv, model_id, settings),
                     summarize(plan.source), pinned=model_id in pins)]
    entries += [Entry(name, _loader(args, p, sampling, kv, name, settings), summarize(p.source),
                      pinned=name in pins) for name, p in others]
    return Models(entries, args.max_models, None if keep == "default" else keep)


def check_port(host: str, port: int) -> None:
    """One line naming the port if the server could not listen there: checked by binding it
    (as uvicorn will, SO_REUSEADDR included) before the model loads, not after."""
    import socket

    if not 0 < port < 65536:
        raise MlxMixtralError(f"--port must be between 1 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (OSError, UnicodeError) as e:
        raise MlxMixtralError(f"--host {host}: not an address to listen on ({e})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            why = "is already in use" if e.errno == errno.EADDRINUSE else \
                f"cannot be listened on ({e.strerror or e})"
            raise MlxMixtralError(f"--port {port}: {host}:{port} {why}; stop what uses it "
                                  "or pass another --port") from None


def _ended(worker) -> int:
    if worker.lost is not None:
        raise worker.lost  # the command turns it into one line
    return 0


def add_serve(sub: argparse._SubParsersAction) -> None:
    from .flags import MODEL_HELP

    p = add_command(sub, "serve", run_serve)
    p.add_argument("--model", action="append", default=None,
                   help=MODEL_HELP + "; repeat it to serve several models: the first loads at "
                   "start, the others when a request names them (by folder or file name)")
    add_model_flags(p, model=False)
    p.add_argument("--models-dir", default=None, metavar="FOLDER",
                   help="also serve every model in FOLDER (its model folders and .gguf files), "
                   "each loaded when a request names it")
    p.add_argument("--max-models", type=int, default=1, metavar="N",
                   help="models loaded at once; loading another unloads the least recently "
                   "used idle one (default %(default)s)")
    p.add_argument("--pin", action="append", default=[], metavar="NAME",
                   help="never unload this model to make room or when idle (repeatable)")
    p.add_argument("--keep-alive", default=None, metavar="DURATION",
                   help="unload a model idle this long, e.g. 5m, 1h, 300 (seconds); 0: as soon "
                   "as it is idle; a request's Ollama keep_alive overrides it (default: keep "
                   "models loaded until --max-models needs the room)")
    add_kv_flags(p)
    add_serve_flags(p)
    add_store_flags(p)
    add_distributed_flags(p)


def _model_names(args: argparse.Namespace) -> list[str | None]:
    """The models to serve: each --model, then the models in --models-dir ([None]: the
    default model)."""
    names: list[str | None] = list(args.model or [])
    if args.models_dir is not None:
        folder = Path(args.models_dir).expanduser()
        if not folder.is_dir():
            raise MlxMixtralError(f"--models-dir {args.models_dir}: not a folder")
        found = sorted(str(p) for p in folder.iterdir()
                       if (p.is_dir() and (p / "config.json").is_file())
                       or (p.is_file() and p.suffix == ".gguf"))
        if not found:
            raise MlxMixtralError(f"--models-dir {args.models_dir}: no model folder (with a "
                                  "config.json) or .gguf file in it")
        names += found
    return names or [None]


def renamed(error: MlxMixtralError, param: str, given: str) -> MlxMixtralError:
    """`error` naming the parameter the user gave (`given`) where it names `param`."""
    if param not in error.params or param == given:
        return error
    import re

    return type(error)(re.sub(rf"\b{param}\b", given, str(error)),
                       params=tuple(given if p == param else p for p in error.params))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_serve(args: argparse.Namespace) -> int:
    import signal

    sampling, kv = sampling_from(args), kv_from(args)  # validate before the slow load
    settings = store_wanted(args, launched())
    reserve, shrink, named = ram_wanted(args)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops `serve` as Ctrl+C does
    group = lockstep = None
    if not launched():
        check_port(args.host, args.port)  # one line before anything loads
    else:  # rank 0 serves HTTP, the other ranks follow its jobs
        from ..generation.lockstep import Lockstep
        from .distributed import join

        group, dog = join(args.dist_timeout)
        dog.stop()  # loading takes what it takes; the jobs arm it again
        lockstep = Lockstep(group, busy=dog.beat, idle=dog.stop)
        if lockstep.leader:
            check_port(args.host, args.port)  # rank 0 listens

    names = _model_names(args)
    if len(names) > 1 and (group is not None or args.max_memory):
        raise MlxMixtralError(("--max-memory" if args.max_memory else "mlx.launch")
                              + " serves one model: give one --model (and no --models-dir)")
    try:
        plan = plan_for_cli(names[0], args.force, args.dtype, group, args.pipeline,
                            args.max_memory, reserve, shrink, args.read_threads)
        # (one line before loading, if it cannot: a --cache-ram that does not fit in
        # --max-memory too)
    except MlxMixtralError as e:
        raise renamed(e, "prompt_cache_bytes", named) from None
    others = [(model_name(n, p.name), p) for n, p in
              ((n, plan_for_cli(n, args.force, args.dtype)) for n in names[1:])]
    try:
        return serve(args, plan, sampling, kv, lockstep, settings, others)
    except MlxMixtralError:
        raise
    except Exception as e:
        if group is None:
            raise
        from .distributed import lost

        raise lost(e, group) from None
