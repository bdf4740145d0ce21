"""Benchmark: cold reads of every expert from a stacked and a per-expert (`convert --layout
per-expert`) folder of the same synthetic 4-bit Mixtral.

Usage: python benchmarks/expert_layout_reads.py [--layers N] [--runs R] [--workdir DIR]
Linux only (the page cache is dropped with posix_fadvise before each run). Each run reads every
expert once, in one shuffled order, on one thread, as expert paging reads a miss: its ranges one
by one (9 per expert in either layout), and, for the per-expert layout, also as one read of its
contiguous range. Prints the median GB/s over the runs.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from mlx_mixtral import ModelArgs
from mlx_mixtral.convert import convert
from mlx_mixtral.convert.synthetic import write_hf_checkpoint
from mlx_mixtral.loading import describe
from mlx_mixtral.loading.expert_files import Extent, expert_extents

SHAPE = dict(model_type="mixtral", vocab_size=512, hidden_size=1024, intermediate_size=3584,
             num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
             num_experts_per_tok=2, max_position_embeddings=4096, rope_theta=1e4)


def drop_page_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def spans(extents: list[Extent], whole: bool) -> list[tuple[int, int, int]]:
    """(file, offset, bytes) reads of one expert: each range, or (`whole`) one covering all."""
    xs = sorted(extents, key=lambda x: (x.file, x.offset))
    if whole:
        assert len({x.file for x in xs}) == 1, "an expert spans files"
        return [(xs[0].file, xs[0].offset, xs[-1].offset + xs[-1].nbytes - xs[0].offset)]
    return [(x.file, x.offset, x.nbytes) for x in xs]


def cold_run(folder: Path, layers: int, order: list[tuple[int, int]], whole: bool) -> float:
    """GB/s of one cold pass over every expert."""
    files = describe(folder).files
    table = expert_extents(files, layers, SHAPE["num_local_experts"])
    fds = [os.open(p, os.O_RDONLY) for p in files]
    drop_page_cache(files)
    start, total = time.perf_counter(), 0
    for layer, expert in order:
        for file, offset, nbytes in spans(table[layer][expert], whole):
            total += len(os.pread(fds[file], nbytes, offset))
    seconds = time.perf_counter() - start
    for fd in fds:
        os.close(fd)
    return total / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers, 55 MB each")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="expert-layout-"))
    shape = ModelArgs.from_dict({**SHAPE, "num_hidden_layers": args.layers})
    if not (work / "per-expert" / "config.json").is_file():
        write_hf_checkpoint(work / "hf", shape, dtype=mx.bfloat16)
        for layout in ("stacked", "per-expert"):
            convert(work / "hf", work / layout, quantize=True, dtype="float32", progress=False,
                    layout=layout, force=True)
    order = [(layer, e) for layer in range(args.layers)
             for e in range(SHAPE["num_local_experts"])]
    random.Random(0).shuffle(order)
    cases = {"stacked, 9 reads per expert": ("stacked", False),
             "per-expert, 9 reads per expert": ("per-expert", False),
             "per-expert, 1 read per expert": ("per-expert", True)}
    speeds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):  # alternating, so the machine's load falls on each alike
        for name, (layout, whole) in cases.items():
            speeds[name].append(cold_run(work / layout, args.layers, order, whole))
    print(f"{args.layers} layers x {SHAPE['num_local_experts']} experts, cold, one thread, "
          f"median of {args.runs} runs ({work})")
    for name, values in speeds.items():
        print(f"  {name:32s} {statistics.median(values):5.2f} GB/s  "
              f"({' '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
