"""`mlx-mixtral`: the command line. Bad input ends in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import difflib
import sys

from .. import __version__
from ..errors import DistributedError, MlxMixtralError
from .bench_command import add_bench
from .cache_command import add_cache
from .chat import add_chat
from .commands import COMMANDS, Parser, command_parser
from .flags import with_flags
from .generate import add_generate
from .load_model import load_model_for_cli
from .model_commands import add_convert, add_info, add_list
from .serve import add_serve

__all__ = ["build_parser", "load_model_for_cli", "main"]

EXIT_BAD_INPUT = 2
EXIT_LOST_RANK = 1  # under mlx.launch: another rank stopped


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mlx-mixtral",
                    description="Run Mistral and Mixtral models locally on MLX.")
    parser.add_argument("--version", action="version", version=f"mlx-mixtral {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_chat(sub)
    add_generate(sub)
    add_convert(sub)
    add_info(sub)
    add_list(sub)
    add_cache(sub)
    add_bench(sub)
    add_serve(sub)
    return parser


def unknown_command(word: str) -> str:
    """The refusal of a first word that names no command, with the likeliest one."""
    close = difflib.get_close_matches(word, COMMANDS, n=1)
    guess = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown command '{word}'{guess}; the commands: {', '.join(COMMANDS)}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        parser.error(unknown_command(argv[0]))  # chat takes no word: a command mistyped
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help", "--version"):
        argv = ["chat", *argv]  # no command: chat, the main job (`mlx-mixtral --model M`)
    args, extra = parser.parse_known_args(argv)
    if extra:  # refused by the command, as its other mistakes are, not by `mlx-mixtral`
        command_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args)
    except MlxMixtralError as e:
        # One line, whatever a library put in it, naming flags where the library names
        # parameters.
        message = " ".join(with_flags(e, parser, args.command).split("\n"))
        print(f"mlx-mixtral: error: {message}", file=sys.stderr, flush=True)
        return EXIT_LOST_RANK if isinstance(e, DistributedError) else EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("mlx-mixtral: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
