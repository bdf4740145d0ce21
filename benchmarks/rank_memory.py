"""What one rank of two costs against one process, over the whole process with loading
included: MLX's peak, the peak resident memory above the interpreter's own, the bytes read while
loading; resident, and within a per-rank --max-memory (greedy tokens checked against one
process's). The README's tables under "Several Macs" come from here.

    python benchmarks/rank_memory.py --model FOLDER [--tokens 256] [--max-memory BYTES]

Each run is tests/dist_probe.py, the ranks started directly (as mlx.launch starts them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from distributed_decode import free_ports

PROBE = Path(__file__).resolve().parents[1] / "tests" / "dist_probe.py"


def probe(mode: str, folder: str, out: str, *extra: str) -> list[dict]:
    command = [sys.executable, str(PROBE), mode, folder, out, *extra]
    if mode == "single":
        subprocess.run(command, check=True)
        return [json.loads(Path(f"{out}.0.json").read_text())]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([[f"127.0.0.1:{p}"] for p in free_ports(2)], f)
    procs = [subprocess.Popen(command, env={**os.environ, "MLX_RANK": str(r),
                                            "MLX_HOSTFILE": f.name},
                              stderr=subprocess.DEVNULL) for r in range(2)]
    if [p.wait(timeout=1800) for p in procs] != [0, 0]:
        raise SystemExit(f"a rank failed ({mode})")
    os.unlink(f.name)
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an MLX or Hugging Face folder")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--max-memory", type=int, default=None, help="each rank's budget")
    args = parser.parse_args()
    stored = sum(p.stat().st_size for p in Path(args.model).glob("*.safetensors"))
    tmp = tempfile.mkdtemp()
    one = probe("single", args.model, f"{tmp}/single", str(args.tokens))[0]
    extra = [str(args.tokens)] + ([str(args.max_memory)] if args.max_memory else [])
    print(f"{args.model}: {stored / 1e6:.1f} MB stored; one process: MLX peak "
          f"{one['peak'] / 1e6:.1f} MB, peak RSS {one['rss'] / 1e6:.1f} MB, read "
          f"{one['read'] / 1e6:.1f} MB")
    for mode in ("tensor", "pipeline"):
        for r, rank in enumerate(probe(mode, args.model, f"{tmp}/{mode}", *extra)):
            same = "same tokens" if rank["tokens"] == one["tokens"] else "OTHER TOKENS"
            print(f"  {mode} rank {r}: MLX peak {rank['peak'] / 1e6:.1f} MB "
                  f"({rank['peak'] / one['peak']:.2f}x), peak RSS {rank['rss'] / 1e6:.1f} MB "
                  f"({rank['rss'] / one['rss']:.2f}x), read {rank['read'] / 1e6:.1f} MB "
                  f"({rank['read'] / stored:.2f}x), {rank['slots'] or 'all'} experts per layer "
                  f"in memory, {rank['expert_reads']} experts read, {same}")


if __name__ == "__main__":
    main()
