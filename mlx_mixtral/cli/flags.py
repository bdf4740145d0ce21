"""The flags several commands share: the model, its memory, and sampling."""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING

from ..errors import MlxMixtralError

if TYPE_CHECKING:
    from ..generation.sampling import SamplingParams

MODEL_HELP = ("a model folder, a .gguf file, a Hugging Face repo id, or ollama:NAME[:TAG] "
              "(default: $MLX_MIXTRAL_MODEL, then \"model\" in the user config file, then the "
              "offline demo model SmolLM2-135M-Instruct)")


class _Given(argparse.Action):
    """Stores the value and notes that the user gave it: a model's own sampling defaults
    (generation/sampling.py's MODEL_DEFAULTS) replace only the settings not given."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given_sampling = getattr(namespace, "given_sampling", frozenset()) | {self.dest}


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """One flag per sampling setting, as `generation.sampling.SETTINGS` declares it."""
    from ..generation.sampling import SETTINGS

    for s in SETTINGS:
        p.add_argument(*s.cli_flags, dest=s.name, type=s.kind, default=s.default, help=s.help,
                       action=_Given)


def sampling_from(args: argparse.Namespace) -> SamplingParams:
    from ..generation.sampling import SETTINGS, SamplingParams

    return SamplingParams(**{s.name: getattr(args, s.name) for s in SETTINGS})


def given_sampling(args: argparse.Namespace) -> frozenset[str]:
    """The sampling settings given as flags (the others may take the model's defaults)."""
    return getattr(args, "given_sampling", frozenset())


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each API parameter's flag, over every command: a flag's dest is the parameter's name
    (`max_memory` -> --max-memory, `temperature` -> --temp)."""
    names: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names = {**flag_names(sub), **names}
        elif action.option_strings:
            longs = [o for o in action.option_strings if o.startswith("--")]
            names.setdefault(action.dest, (longs or action.option_strings)[0])
    return names


def command_flag_names(parser: argparse.ArgumentParser, command: str | None) -> dict[str, str]:
    """`flag_names`, the flags of `command` (the one that ran) first: a parameter that command
    spells its own way (`info --memory` for max_memory) is named as that command spells it."""
    names = flag_names(parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            names = {**names, **flag_names(action.choices[command])}
    return names


def with_flags(error: MlxMixtralError, parser: argparse.ArgumentParser,
               command: str | None = None) -> str:
    """The error's message with the CLI's flags in place of the parameters it names:
    "max_memory=2GB" -> "--max-memory 2GB", "force=True" -> "--force", "top_p" -> "--top-p";
    as `command` spells them, if given."""
    message, flags = str(error), command_flag_names(parser, command)
    for param in error.params:
        flag = flags.get(param)
        if flag is not None:
            message = re.sub(rf"\b{param}\b(=True\b|=)?",
                             lambda m, f=flag: f + (" " if m.group(1) == "=" else ""), message)
    return message


FORCE_HELP = "load the model even if it looks too big for the available memory"
DTYPE_CHOICES = ["float32", "float16", "bfloat16"]
DTYPE_HELP = ("compute in this dtype (default: float32 on the CPU backend, the checkpoint's own "
              "on Metal)")


MAX_MEMORY_HELP = ("run within this much memory, e.g. 12GB: a Mixtral larger than that keeps "
                   "some experts per layer in memory and reads the others from disk when "
                   "chosen (MLX or Hugging Face safetensors folders, and GGUF files or "
                   "ollama:NAME with Q4_0, Q4_1 or Q8_0 experts); one line at load states "
                   "the plan (default: no budget, the whole model loads)")


def read_threads_flag(text: str) -> int:
    """--read-threads: a whole number in range, else one line."""
    from ..errors import ConfigError
    from ..model.expert_cache import check_read_threads

    try:
        return check_read_threads(int(text))
    except (ValueError, ConfigError):
        raise argparse.ArgumentTypeError(f"a whole number from 1 to 64, got {text!r}") from None


def add_model_flags(p: argparse.ArgumentParser, model: bool = True,
                    sampling: bool = True) -> None:
    """--model, --force, --dtype, --max-memory and --read-threads, and the sampling flags, for
    the commands that load a model."""
    if model:
        p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help=DTYPE_HELP)
    p.add_argument("--max-memory", default=None, metavar="SIZE", help=MAX_MEMORY_HELP)
    p.add_argument("--read-threads", type=read_threads_flag, default=None, metavar="N",
                   help="with --max-memory: threads reading paged experts from disk at once, "
                   "1 to 64 (default: 8; an SSD reads fastest with several reads in flight)")
    if sampling:
        add_sampling_flags(p)


def add_store_flags(p: argparse.ArgumentParser, one_prompt: bool = False) -> None:
    """The prefix store's flags (prefixes/settings.py holds the defaults). `one_prompt`: the
    command reads one prompt and ends (`generate`), so blocks in memory would serve nothing
    and only add to its peak: its RAM tier is empty unless asked for."""
    from ..prefixes.settings import DEFAULT_BLOCK

    p.add_argument("--cache-block", type=int, default=DEFAULT_BLOCK, metavar="TOKENS",
                   help="tokens per block of the prefix store: a prompt reuses stored keys "
                   "and values in whole blocks (default: %(default)s)")
    if one_prompt:
        p.add_argument("--cache-ram", default="0", metavar="SIZE",
                       help="prefix-store blocks kept in memory while the command runs: one "
                       "prompt reuses none of them, its blocks go to disk (default: 0)")
    else:
        p.add_argument("--cache-ram", default=None, metavar="SIZE",
                       help="prefix-store blocks kept in memory, least recently used out first "
                       "(default: 2GB or an eighth of the machine's memory, whichever is less)")
    p.add_argument("--cache-disk", default=None, metavar="SIZE",
                   help="prefix-store blocks kept on disk, so prompts are remembered across "
                   "restarts; 0 keeps none (default: 32GB or a tenth of the free disk, "
                   "whichever is less)")


def size_flag(text: str, flag: str) -> int:
    """A size given on the command line ("0" allowed)."""
    from ..units import parse_size

    try:
        return int(text) if text.strip().isdigit() else parse_size(text)
    except ValueError as e:
        raise MlxMixtralError(f"{flag}: {e}") from None


def store_settings(args: argparse.Namespace):
    """The prefix store's settings from --cache-block, --cache-ram and --cache-disk."""
    from ..prefixes.settings import MAX_BLOCK, StoreSettings

    if not 1 <= args.cache_block <= MAX_BLOCK:
        raise MlxMixtralError(f"--cache-block must be between 1 and {MAX_BLOCK} tokens, got "
                              f"{args.cache_block}")
    ram = None if args.cache_ram is None else size_flag(args.cache_ram, "--cache-ram")
    disk = None if args.cache_disk is None else size_flag(args.cache_disk, "--cache-disk")
    return StoreSettings(args.cache_block, ram, disk)
