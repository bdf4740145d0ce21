"""Run alone or as one rank of several: load a model (split over the ranks as asked, within a
budget if given, paged with 3 reader threads), and write rank 0's logits for fixed tokens, a
greedy continuation, and what each rank cost over the whole process, loading included
(OUT.RANK.json): MLX's peak memory
(never reset), the peak resident memory above the interpreter's own before loading, and the
bytes read while loading.

    python tests/dist_probe.py MODE FOLDER OUT [TOKENS [MAX_MEMORY]]
        (MODE: single, tensor or pipeline)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_mixtral import load
from mlx_mixtral.generation import stream_generate
from mlx_mixtral.generation.stats import Stats


def status(key: str) -> int:
    """A /proc/self/status figure (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def rchar() -> int:
    """Bytes this process has read through read-like calls (/proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise KeyError("rchar")


mode, folder, out = sys.argv[1:4]
max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 40
budget = int(sys.argv[5]) if len(sys.argv) > 5 else None
group = mx.distributed.init() if mode != "single" else None
if group is not None:  # every rank is here before anyone reads
    mx.eval(mx.distributed.all_sum(mx.array(1), group=group))
base = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on
read_before = rchar()
model, tokenizer = load(folder, group=group, pipeline=mode == "pipeline", max_memory=budget,
                        context=512 if budget else None, read_threads=3 if budget else None)
for layer in model.layers:  # read the weights layer by layer, as the app does
    mx.eval(layer.parameters())
mx.eval(model.parameters())
read = rchar() - read_before
loaded = mx.get_peak_memory()
ids = [(7 * i + 3) % model.args.vocab_size for i in range(24)]
logits = model(mx.array([ids])).astype(mx.float32)
mx.eval(logits)
tokens = []
for item in stream_generate(model, tokenizer, ids, temperature=0, max_tokens=max_tokens):
    if isinstance(item, Stats):
        tokens = item.tokens
rank = group.rank() if group is not None else 0
pager = model.limits.expert_pager
with open(f"{out}.{rank}.json", "w") as f:
    json.dump({"tokens": tokens, "peak": mx.get_peak_memory(), "loaded": loaded,
               "rss": status("VmHWM") - base, "read": read,
               "layers": len(model.layers),
               "paged_layers": len(pager.slots) if pager is not None else 0,
               "slots": pager.num_slots if pager is not None else 0,
               "read_threads": pager.read_threads if pager is not None else 0,
               "expert_reads": pager.stats.total().reads if pager is not None else 0,
               "budget": budget}, f)
if rank == 0:
    np.save(f"{out}.npy", np.array(logits))
