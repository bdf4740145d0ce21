"""Size against quality for each conversion recipe, on a real model: the README's table.

SmolLM2-135M-Instruct (the demo model, a Q4_1 GGUF) is dense, so its MLP bits stand in for
the expert bits of a Mixtral recipe. Its Q4_1 weights, dequantized to float32, are the source;
every recipe converts that source with `mlx-mixtral convert`, and each result's perplexity is
measured on tests/data/perplexity.txt (a fixed text written for this), tokenized by the model's
own tokenizer, in chunks of 128 tokens through the KV cache.

    python benchmarks/perplexity.py [--tokens N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_mixtral.convert import convert
from mlx_mixtral.loading import describe, load, load_model, resolve
from mlx_mixtral.loading.memory import load_bytes

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "perplexity.txt"
# (label, convert keywords); None: the source itself
RECIPES = [("source (Q4_1, dequantized)", None),
           ("8-bit", dict(q_bits=8)),
           ("6-bit", dict(q_bits=6)),
           ("mixed-4-6", dict(recipe="mixed-4-6")),
           ("4-bit", dict(q_bits=4)),
           ("mixed-3-4", dict(recipe="mixed-3-4")),
           ("3-bit", dict(q_bits=3)),
           ("mixed-2-4", dict(recipe="mixed-2-4"))]


def dequantized_source(out: Path) -> None:
    """The demo GGUF as a float32 folder: every quantized layer turned back into floats."""
    from mlx_mixtral.loading.loader import build

    source = describe(resolve("demo"))
    model, _ = build(source, "float32", fuse=False)
    weights = dict(tree_flatten(model.parameters()))
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weights[f"{path}.weight"] = mx.dequantize(
                module.weight, weights.pop(f"{path}.scales"), weights.pop(f"{path}.biases"),
                module.group_size, module.bits)
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    config = {**source.config, "torch_dtype": "float32", "architectures": ["LlamaForCausalLM"]}
    (out / "config.json").write_text(json.dumps(config, indent=2))


def perplexity(model, ids: list[int], chunk: int = 128) -> float:
    cache = model.make_cache()
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        x = ids[start:start + chunk + 1]
        logits = model(mx.array([x[:-1]]), cache=cache)[0].astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        target = mx.array(x[1:])
        nll -= mx.take_along_axis(logp, target[:, None], axis=-1).sum().item()
        count += len(x) - 1
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--keep", type=Path, default=None, help="keep the folders here")
    args = parser.parse_args()
    _, tokenizer = load("demo")
    ids = tokenizer.encode(TEXT.read_text(), add_bos=False)[: args.tokens + 1]
    root = args.keep or Path(tempfile.mkdtemp())
    src = root / "source"
    if not src.exists():
        dequantized_source(src)
    rows = []
    for label, options in RECIPES:
        folder = src if options is None else root / label
        if options is not None and not folder.exists():
            convert(src, folder, quantize=True, dtype="float16", progress=False, **options)
        start = time.perf_counter()
        if options is None:  # the GGUF itself: the same numbers, quantized kernels (faster)
            model, _ = load("demo", tokenizer=False)
            nbytes = load_bytes(describe(src), "float16")
        else:
            model = load_model(folder)
            nbytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        ppl = perplexity(model, ids)
        rows.append((label, nbytes, ppl))
        print(f"{label}: {nbytes / 1e6:.1f} MB, perplexity {ppl:.3f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        del model
    base = rows[0][2]
    params = sum(v.size for _, v in tree_flatten(load_model(src).parameters()))
    print(f"\n{len(ids) - 1} tokens of tests/data/perplexity.txt\n")
    print("| recipe (SmolLM2: MLP bits stand in for expert bits) | size | bits per weight "
          "| perplexity | vs source |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, nbytes, ppl in rows:
        print(f"| {label} | {nbytes / 1e6:.0f} MB | {8 * nbytes / params:.2f} | {ppl:.2f} | "
              f"{(ppl / base - 1) * 100:+.1f}% |")


if __name__ == "__main__":
    main()
