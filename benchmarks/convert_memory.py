"""Benchmark: peak memory of `mlx-mixtral convert -q` on a synthetic bf16 Mixtral-shaped checkpoint.

Usage: python benchmarks/convert_memory.py [--layers N] [--shard-gb G] [--workdir DIR] [--keep]
Prints the checkpoint size, the converter's peak RSS (its own process) and their ratio, and
exits with status 1 when the peak is above the target (40% of the checkpoint, --target).
The default, 7 layers in shards of 0.3 GB, is 1.40 GB in 5 shards; `--layers 17 --shard-gb 1` is
3.22 GB in 4 shards.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlx_mixtral import ModelArgs
from mlx_mixtral.convert.synthetic import write_hf_checkpoint

SHAPE = dict(model_type="mixtral", vocab_size=32000, hidden_size=1024, intermediate_size=3584,
             num_attention_heads=16, num_key_value_heads=4,
             num_local_experts=8, num_experts_per_tok=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=7,
                        help="decoder layers, 0.18 GB each (plus 0.13 GB of embeddings)")
    parser.add_argument("--shard-gb", type=float, default=0.3,
                        help="the largest input shard: the converter reads one at a time")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    parser.add_argument("--target", type=float, default=0.40,
                        help="the highest peak RSS allowed, as a share of the checkpoint")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="convert-memory-"))
    src, out = work / "hf", work / "mlx-q4"
    try:
        shape = ModelArgs.from_dict({**SHAPE, "num_hidden_layers": args.layers})
        size = write_hf_checkpoint(src, shape, shard_bytes=int(args.shard_gb * 1e9))
        shards = len(list(src.glob("*.safetensors")))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", "convert", "--hf-path",
                        str(src), "--mlx-path", str(out), "-q", "--force"], check=True)
        seconds = time.perf_counter() - start
        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB else
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit
        print(f"checkpoint: {size / 1e9:.2f} GB bf16 in {shards} shards")
        print(f"converted to 4 bits in {seconds:.1f} s; peak RSS {peak / 1e9:.2f} GB "
              f"= {peak / size:.1%} of the checkpoint (target <= {args.target:.0%})")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if peak > args.target * size:
        sys.exit(f"peak RSS is above the target of {args.target:.0%}")


if __name__ == "__main__":
    main()
