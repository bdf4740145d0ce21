"""`mlx-mixtral convert`, `info` and `list`: the commands about models that generate nothing."""

from __future__ import annotations

import argparse

from ..errors import MlxMixtralError
from .commands import add_command, model_or_preset
from .flags import DTYPE_CHOICES, MODEL_HELP


def add_convert(sub: argparse._SubParsersAction) -> None:
    from ..convert.expert_layout import LAYOUTS
    from ..convert.plan import Q_BITS, Q_GROUP_SIZES, RECIPES

    p = add_command(sub, "convert", run_convert)
    p.add_argument("--hf-path", required=True,
                   help="source: a folder (config.json + safetensors) or Hugging Face repo id, "
                   "a .gguf file, or ollama:NAME. A GGUF's Q4_0, Q4_1 and Q8_0 tensors are "
                   "written as they are (exact); other quantized types are dequantized")
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
    p.add_argument("--layout", choices=LAYOUTS, default="stacked",
                   help="how a Mixtral's experts lie in the files: stacked (mlx-lm's), or "
                   "per-expert: each expert's tensors side by side, one read when --max-memory "
                   "pages it in (both load in mlx-lm)")
    p.add_argument("--force", action="store_true", help="replace an existing --mlx-path")
    p.add_argument("--verify", action="store_true",
                   help="afterwards, compare source and output on a fixed text (loads both)")


def run_convert(args: argparse.Namespace) -> int:
    from ..convert import convert

    summary = convert(
        args.hf_path, args.mlx_path, quantize=args.quantize, q_bits=args.q_bits,
        q_group_size=args.q_group_size, expert_bits=args.expert_bits, recipe=args.recipe,
        dtype=args.dtype, dequantize=args.dequantize,
        force=args.force, shard_bytes=int(args.shard_size_gb * 1e9), layout=args.layout,
    )
    print(summary)
    from ..catalog.local import remember

    remember(args.mlx_path)  # offered again by `list` and the app's model picker
    if args.verify:
        from ..convert.verify import verify

        print(verify(summary.source or args.hf_path, args.mlx_path))
    return 0


def add_info(sub: argparse._SubParsersAction) -> None:
    from ..model.config import PRESETS

    p = add_command(sub, "info", run_info)
    model_or_preset(p, MODEL_HELP, PRESETS, "a released model's shape, no weights needed")
    p.add_argument("--ranks", type=int, default=1,
                   help="also show the memory each of this many ranks needs (mlx.launch)")
    p.add_argument("--memory", dest="max_memory", default=None, metavar="SIZE",
                   help="plan for this much memory, e.g. 16GB: for each precision, whether "
                   "the model is resident, pages its experts (how many per layer stay in "
                   "memory, bytes read per token) or does not fit (default: this machine)")


def run_info(args: argparse.Namespace) -> int:
    from .info import info

    if args.ranks < 1:
        raise MlxMixtralError("--ranks must be >= 1")
    memory = None
    if args.max_memory is not None:  # the library's max_memory: its errors name --memory
        from ..loading.memory_plan import budget_bytes

        memory = budget_bytes(args.max_memory)
    print(info(args.model, args.preset, args.ranks, memory))
    return 0


def add_list(sub: argparse._SubParsersAction) -> None:
    add_command(sub, "list", run_list)


def run_list(args: argparse.Namespace) -> int:
    from .listing import list_main

    print(list_main())
    return 0
