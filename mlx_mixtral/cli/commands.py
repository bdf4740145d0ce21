"""Each command's help, and how a command joins the parser."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import NoReturn

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
        "convert Hugging Face weights or a GGUF into an MLX folder (optionally quantized)",
        "Convert a Hugging Face checkpoint (safetensors), a GGUF file or ollama:NAME into an "
        "MLX folder, "
        "streamed shard by shard and written atomically. With -q: experts and attention at "
        "--q-bits, embeddings and output head at >= 6 bits, router gate and norms unquantized."),
    "info": (
        "architecture, size and memory needs of a model or preset",
        "Print a model's architecture, parameters (total and active per token), "
        "layers, experts, window, context, vocabulary, the KV cache per token, and one memory "
        "table: for float16, 8/6/4/3 bits and the mixed recipes, the weights and whether they "
        "run in the memory available now (or --memory) resident, paging experts, or not."),
    "list": (
        "the models this machine has, with their sizes",
        "List the models this machine has: Hugging Face cache folders, models pulled with "
        "Ollama, converted folders and models you have opened, and the offline demo; each "
        "with its size on disk, its size once loaded, and whether it fits in the memory "
        "available now. Pass a NAME to --model."),
    "cache": (
        "show or clear the prefix store (prompts' keys and values kept on disk)",
        "Show the prefix store: its folder, the budgets of its RAM and disk tiers, and per "
        "model the blocks kept on disk and their bytes. `generate`, `serve` and the chat app keep "
        "a prompt's keys and values there in blocks of tokens, so a prompt that starts like an "
        "earlier one (a long system prompt, a document) prefills only the rest, also after a "
        "restart. `mlx-mixtral cache clear` deletes every block (no question asked), with "
        "--model NAME only that model's; a running server keeps what it holds in memory until "
        "it stops. No model is loaded."),
    "bench": (
        "measure speed and memory, side by side with mlx-lm",
        "Measure prefill and decode tokens/s, time to first token, peak memory and "
        "load time (medians over --runs). With --compare mlx-lm the same weights also run "
        "through mlx-lm, alternating with ours, and each figure gets a ratio (>1: we are "
        "better). Presets are synthetic 4-bit models of fixed shape and seed. With "
        "--max-memory (sizes, shares of the model's size, or min: min,50%%,75%%) it runs expert "
        "paging within each budget next to the fully resident model (left out when the model "
        "does not fit in the memory available): tok/s, hit rates per layer with and without "
        "prefetch, and bytes read per token. A budget is the share asked of the model plus "
        "the process's fixed memory (about 14 MB)."),
    "serve": (
        "serve the model over HTTP: OpenAI's and Ollama's APIs",
        "Serve the model over HTTP on loopback: OpenAI's API under /v1 (chat/completions, "
        "completions, models) and Ollama's under /api (chat, generate, tags, show, version), "
        "with /health. Requests run together (continuous batching); prompts are kept in the "
        "prefix store, in memory (--cache-ram) and on disk (--cache-disk) across restarts, so "
        "a conversation's next turn, or another conversation with the same system prompt, "
        "prefills only what is new. "
        "response_format and Ollama's format are enforced while decoding; Mistral v3 models "
        "call tools. The sampling flags are the defaults for requests that leave them out."),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default once: appended only where the help does not say it in words and
    there is one to show (not None, as a required flag has, nor an empty list); descriptions are
    %-formatted like help strings, so both write a percent sign as %%."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None or action.default == []:
            return text
        return super()._get_help_string(action) or ""

    def _format_text(self, text: str) -> str:
        return super()._format_text(text % {"prog": self._prog})


class Parser(argparse.ArgumentParser):
    """argparse's parser, for `mlx-mixtral` and each command (subparsers take their parent's
    class): a mistake is one line and exit 2, and a negative value such as `-1GB` is read as
    the flag's value (then refused by the flag), not as an unknown flag."""

    # argparse reads only -1 and -1.5 as values; sizes and exponents are values too.
    NEGATIVE_VALUE = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*[a-zA-Z%]*$")

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = self.NEGATIVE_VALUE

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())
        print(f"{self.prog}: error: {line} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of `command`, one of `parser`'s subcommands."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def add_command(sub: argparse._SubParsersAction, name: str,
                run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """A subcommand whose --help shows every default; it runs `run`."""
    summary, description = COMMANDS[name]
    p = sub.add_parser(name, help=summary, description=description)
    p.set_defaults(run=run)
    return p


def model_or_preset(p: argparse.ArgumentParser, model_help: str, presets: dict,
                     preset_help: str) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--model", default=None, help=model_help)
    group.add_argument("--preset", choices=sorted(presets), default=None, help=preset_help)
