"""`mlx-mixtral`: the command line. Bad input ends in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import MlxMixtralError

EXIT_BAD_INPUT = 2


def _convert_parser(sub: argparse._SubParsersAction) -> None:
    from .convert.plan import DTYPES, Q_BITS, Q_GROUP_SIZES

    p = sub.add_parser(
        "convert",
        help="convert Hugging Face weights into an MLX folder (optionally quantized)",
        description="Convert a Hugging Face checkpoint (safetensors) into an MLX folder, "
        "streamed shard by shard and written atomically. With -q: experts and attention at "
        "--q-bits, embeddings and output head at >= 6 bits, router gate and norms unquantized.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--hf-path", required=True, help="source folder (config.json + safetensors)")
    p.add_argument("--mlx-path", required=True, help="output folder (must not exist)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    p.add_argument("--q-bits", type=int, choices=Q_BITS, default=4, help="bits per weight")
    p.add_argument("--q-group-size", type=int, choices=Q_GROUP_SIZES, default=64,
                   help="weights per quantization group")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of unquantized tensors and scales (default: the source's)")
    p.add_argument("--dequantize", action="store_true",
                   help="turn a quantized MLX folder back into floats")
    p.add_argument("--shard-size-gb", type=float, default=5.0, help="maximum shard size in GB")
    p.add_argument("--force", action="store_true", help="replace an existing --mlx-path")
    p.add_argument("--verify", action="store_true",
                   help="afterwards, compare source and output on a fixed text (loads both)")
    p.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    summary = convert(
        args.hf_path, args.mlx_path, quantize=args.quantize, q_bits=args.q_bits,
        q_group_size=args.q_group_size, dtype=args.dtype, dequantize=args.dequantize,
        force=args.force, shard_bytes=int(args.shard_size_gb * 1e9),
    )
    print(summary)
    if args.verify:
        from .convert.verify import verify

        print(verify(args.hf_path, args.mlx_path))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-mixtral",
        description="Run Mistral and Mixtral models locally on MLX.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mlx-mixtral {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _convert_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return args.run(args)
    except MlxMixtralError as e:
        print(f"mlx-mixtral: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("mlx-mixtral: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
