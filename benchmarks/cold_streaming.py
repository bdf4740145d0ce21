"""Benchmark: cold decode with expert streaming, today's reads against the new ones, side by
side in one run on the same model and budget.

Usage: python benchmarks/cold_streaming.py [--bits 4|8|16|32] [--share 0.5] [--runs 3]
       [--prompt-tokens 16] [--gen-tokens 32] [--read-threads 8] [--workdir DIR]

One synthetic Mixtral (seeded, `SHAPE`) is written twice: in the stacked layout `convert` wrote
before (an expert is 9 ranges spread over the file) and in the per-expert layout (`convert
--layout per-expert`: one contiguous range). Both load within the same budget (`--share` of the
model plus the process's fixed memory outside MLX, as `bench --max-memory 50%` plans it):
- "before": the stacked folder read as the code before the reader pool read it: one thread,
  each range alone, a layer's misses in turn (prefetch on its own thread);
- "after": the per-expert folder read by `--read-threads` threads, an expert in one read.
Each run is cold (Linux: the files dropped from the page cache before the run and every range
dropped again after it is read, as on a Mac whose memory cannot hold the model); the variants
alternate, and the medians over `--runs` are printed with their ratio (that both give the
resident model's tokens is what tests/test_expert_reads.py and test_expert_layout.py check).
`--bits 32` keeps the experts in float32: on this CPU 4-bit matmuls are slow
enough that computing a token takes as long as reading its misses, while on a Mac's GPU (the
case this models) reading dominates, as it does here for float32 experts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_mixtral import ModelArgs
from mlx_mixtral.cli.bench_paging import measure_paged, share_budget, use_reads
from mlx_mixtral.convert import convert
from mlx_mixtral.convert.synthetic import write_hf_checkpoint
from mlx_mixtral.errors import MlxMixtralError
from mlx_mixtral.loading import describe, load
from mlx_mixtral.loading.memory import load_bytes
from mlx_mixtral.loading.page_cache import can_drop, drop_files

SHAPE = dict(model_type="mixtral", vocab_size=1024, hidden_size=512, intermediate_size=1792,
             num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
             num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
             rope_theta=1e4)


def folders(work: Path, bits: int, scale: float) -> dict[str, Path]:
    """The model in both layouts (built once per --workdir)."""
    tag = f"{bits}" if scale == 1.0 else f"{bits}-r{scale}"
    out = {"stacked": work / f"stacked-{tag}", "per-expert": work / f"per-expert-{tag}"}
    if all((f / "config.json").is_file() for f in out.values()):
        return out
    hf = work / ("hf" if scale == 1.0 else f"hf-r{scale}")
    if not (hf / "config.json").is_file():
        write_hf_checkpoint(hf, ModelArgs.from_dict(SHAPE), dtype=mx.bfloat16, seed=0,
                            residual_scale=scale)
    for layout, folder in out.items():
        convert(hf, folder, quantize=bits < 16, q_bits=min(bits, 8), q_group_size=64,
                dtype="float32" if bits != 16 else "float16", layout=layout, force=True,
                progress=False)
    return out


def disk_speeds(model, files: list[Path], threads: int) -> dict[str, float]:
    """The disk's own ceiling: every expert of the model read cold into a slot, in a random
    order (as decoding asks for them), one whole expert at a time on one thread, then cut into
    pieces for `threads` threads; GB/s each."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    pager = model.limits.expert_pager
    loader = pager.loader
    experts = [(layer, e) for layer in range(len(pager.slots)) for e in range(pager.num_experts)]
    np.random.RandomState(0).shuffle(experts)
    out = {}
    for name, n in (("1 thread", 1), (f"{threads} threads", threads)):
        pager.set_policy("lru", True)  # the slots are overwritten below
        drop_files(files)
        loader.set_cold(True)
        start, total = time.perf_counter(), 0
        with ThreadPoolExecutor(n) as pool:
            for layer, e in experts:
                pieces = loader.pieces(layer, e, 0, n)
                total += sum(pool.map(lambda piece: piece(), pieces))
        out[name] = total / (time.perf_counter() - start) / 1e9
        loader.set_cold(False)
    pager.set_policy("lru", True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bits", type=int, default=32, choices=[4, 8, 16, 32],
                   help="the experts' precision (32: float32, where reading dominates)")
    p.add_argument("--share", type=float, default=0.5, help="the budget, a share of the model")
    p.add_argument("--runs", type=int, default=3, help="runs of each variant (medians)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--read-threads", type=int, default=8, help="the pool's threads (after)")
    # the realistic preset's (bench.py): layers change the residual stream as a trained model's
    p.add_argument("--residual-scale", type=float, default=0.055,
                   help="residual branches' scale (1: random weights' layers)")
    p.add_argument("--workdir", default=None,
                   help="keep the models here between invocations (default: a temporary "
                   "folder, deleted at the end)")
    a = p.parse_args()
    if a.runs < 1 or a.prompt_tokens < 1 or a.gen_tokens < 2 or not 0 < a.share <= 1:
        p.error("--runs and --prompt-tokens must be at least 1, --gen-tokens at least 2, "
                "--share in (0, 1]")
    if not can_drop():
        raise SystemExit("cold reads need posix_fadvise (Linux); on macOS run `sudo purge`")
    with tempfile.TemporaryDirectory(prefix="cold-streaming-") as temporary:
        try:
            run(a, Path(a.workdir or temporary))
        except MlxMixtralError as e:  # a flag's value the package refuses: one line, exit 2
            p.exit(2, f"cold_streaming.py: error: {e}\n")


def run(a: argparse.Namespace, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    paths = folders(work, a.bits, a.residual_scale)
    budget = share_budget(a.share, load_bytes(describe(paths["stacked"])))
    models = {
        "before": load(paths["stacked"], tokenizer=False, max_memory=budget, read_threads=1)[0],
        "after": load(paths["per-expert"], tokenizer=False, max_memory=budget,
                      read_threads=a.read_threads)[0],
    }
    use_reads(models["before"].limits.expert_pager, 1, new=False)
    prompt = mx.array(np.random.RandomState(0).randint(3, SHAPE["vocab_size"], a.prompt_tokens))
    runs: dict[str, list] = {name: [] for name in models}
    for _ in range(a.runs):
        for name, model in models.items():
            pager = model.limits.expert_pager
            pager.set_policy("lru", True)  # empty slots: the same start for both
            drop_files(describe(paths["stacked" if name == "before" else "per-expert"]).files)
            pager.loader.set_cold(True)
            runs[name].append(measure_paged(model, prompt, a.gen_tokens))
            pager.loader.set_cold(False)
    disk = disk_speeds(models["after"], describe(paths["per-expert"]).files, a.read_threads)
    plan = models["after"].limits.memory_plan
    print(f"{a.bits}-bit experts, budget {budget / 1e6:.1f} MB ({a.share:.0%} of "
          f"{load_bytes(describe(paths['stacked'])) / 1e6:.0f} MB + fixed), {plan.slots} of 8 "
          f"experts per layer, {a.prompt_tokens} prompt + {a.gen_tokens} generated tokens, "
          f"cold, medians of {a.runs} runs")
    base = statistics.median(r.decode_tps for r in runs["before"])
    print("| reads | decode tok/s | vs before | read GB/s | read per token | hit rate |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, rs in runs.items():
        tps = statistics.median(r.decode_tps for r in rs)
        label = ("before: stacked, 1 thread, each range alone" if name == "before" else
                 f"after: per-expert, {a.read_threads} threads, one read per expert")
        print(f"| {label} | {tps:.2f} | {tps / base:.2f}x | "
              f"{statistics.median(r.read_gbps for r in rs):.2f} | "
              f"{statistics.median(r.bytes_per_token for r in rs) / 1e6:.1f} MB | "
              f"{statistics.median(r.decode_hit_rate for r in rs):.0%} |")
    (one, many), speeds = disk.values(), ", ".join(f"{k} {v:.2f} GB/s" for k, v in disk.items())
    print(f"The disk alone, every expert read cold in a random order: {speeds} "
          f"({many / one:.2f}x): with equal bytes per token, reads alone cannot make decoding "
          "faster than that")


if __name__ == "__main__":
    main()
