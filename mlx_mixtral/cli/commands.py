"""Each command's help, and how a command joins the parser."""

from __future__ import annotations

import argparse
from collections.abc import Callable

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
        "paging within each budget next to the fully resident model: tok/s, hit rates per "
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


def add_command(sub: argparse._SubParsersAction, name: str,
                run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """A subcommand whose --help shows every default; it runs `run`."""
    summary, description = COMMANDS[name]
    p = sub.add_parser(name, help=summary, description=description,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(run=run)
    return p


def model_or_preset(p: argparse.ArgumentParser, model_help: str, presets: dict,
                     preset_help: str) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--model", default=None, help=model_help)
    group.add_argument("--preset", choices=sorted(presets), default=None, help=preset_help)
