"""Decode speed of one model on 1 rank, and on 2 ranks in tensor and pipeline mode, side by side
on this machine; plus the all_sum latency between the two ranks.

    python benchmarks/distributed_decode.py --model FOLDER [--runs 3] [--gen-tokens 64]

The two ranks are started directly (MLX_RANK and a ring hostfile on 127.0.0.1), as mlx.launch
starts them, and also through mlx.launch itself: on this 2-core machine mlx.launch's own output
relay keeps about one core busy (its select() loop never sleeps while a rank's stdin is
writable), which slows the ranks it starts. Between Macs it runs on the machine you type on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

LATENCY = """
import time, mlx.core as mx
g = mx.distributed.init()
x = mx.ones((4096,))
mx.eval(mx.distributed.all_sum(x, group=g))
ts = []
for _ in range(200):
    t = time.perf_counter(); mx.eval(mx.distributed.all_sum(x, group=g))
    ts.append(time.perf_counter() - t)
if g.rank() == 0:
    print(sorted(ts)[len(ts) // 2] * 1e6)
"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run_ranks(command: list[str], n: int = 2) -> str:
    """Rank 0's stdout, with every rank started directly."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([[f"127.0.0.1:{p}"] for p in free_ports(n)], f)
    procs = [subprocess.Popen(command, env={**os.environ, "MLX_RANK": str(r),
                                            "MLX_HOSTFILE": f.name},
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for r in range(n)]
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    os.unlink(f.name)
    return outs[0]


def decode_tps(text: str) -> float:
    return float(re.search(r"decode tok/s\s+([\d.]+)", text).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an MLX model folder")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    args = parser.parse_args()
    exe = shutil.which("mlx-mixtral")
    bench = [exe, "bench", "--model", args.model, "--runs", str(args.runs),
             "--gen-tokens", str(args.gen_tokens), "--prompt-tokens", str(args.prompt_tokens)]
    rows = {"1 rank": decode_tps(subprocess.run(bench, capture_output=True, text=True,
                                                check=True).stdout)}
    for mode, extra in (("tensor", []), ("pipeline", ["--pipeline"])):
        rows[f"2 ranks, {mode}"] = decode_tps(run_ranks(bench + extra))
        launched = subprocess.run([shutil.which("mlx.launch"), "-n", "2", "--backend", "ring",
                                   *bench, *extra], capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL)
        rows[f"2 ranks, {mode}, via mlx.launch"] = decode_tps(launched.stdout)
    latency = float(run_ranks([sys.executable, "-c", LATENCY]).strip())
    base = rows["1 rank"]
    print(f"decode tok/s (medians of {args.runs} runs, {args.gen_tokens} tokens), {args.model}")
    for name, tps in rows.items():
        print(f"  {name:<34} {tps:8.2f}   {tps / base:.2f}x")
    print(f"  all_sum of 16 KB between 2 ranks: median {latency:.0f} us")


if __name__ == "__main__":
    main()
