"""Run alone or under `mlx.launch`: load a model (split over the ranks as asked), and write
rank 0's logits for fixed tokens, a greedy continuation, and each rank's peak memory
(OUT.RANK.json).

    python tests/dist_probe.py MODE FOLDER OUT      (MODE: single, tensor or pipeline)
"""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import numpy as np

from mlx_mixtral import load
from mlx_mixtral.generation import stream_generate
from mlx_mixtral.generation.stats import Stats

mode, folder, out = sys.argv[1:4]
group = mx.distributed.init() if mode != "single" else None
model, tokenizer = load(folder, group=group, pipeline=mode == "pipeline")
for layer in model.layers:  # read the weights layer by layer, as the app does
    mx.eval(layer.parameters())
mx.eval(model.parameters())
ids = [(7 * i + 3) % model.args.vocab_size for i in range(24)]
logits = model(mx.array([ids])).astype(mx.float32)
mx.eval(logits)
tokens = []
# What each rank holds while generating (loading a tensor-parallel rank reads whole tensors
# before it slices them: that peak is not this test's). stream_generate leaves the counter alone.
mx.reset_peak_memory()
for item in stream_generate(model, tokenizer, ids, temperature=0, max_tokens=40):
    if isinstance(item, Stats):
        tokens = item.tokens
rank = group.rank() if group is not None else 0
with open(f"{out}.{rank}.json", "w") as f:
    json.dump({"tokens": tokens, "peak": mx.get_peak_memory()}, f)
if rank == 0:
    np.save(f"{out}.npy", np.array(logits))
