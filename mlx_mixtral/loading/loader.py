"""`load()`: a model and its tokenizer from whatever form the user has, in one pass.

resolve the name -> describe the file or folder (headers only) -> check it fits in memory ->
build the model (lazy, memory-mapped) -> its tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from ..errors import MemoryLimitError, TokenizerError
from ..model.decoder import Model
from ..model.sharding import check_world
from ..text.tokenizer import Tokenizer, load_folder_tokenizer
from ..units import parse_size
from .checkpoint import build_model, sanitize
from .locate import default_model, resolve
from .memory import check_fits
from .memory_plan import plan_memory
from .safetensors_file import read_safetensors
from .source import ModelSource, describe


def build(source: ModelSource, dtype: str | mx.Dtype | None = None, fuse: bool = True
          ) -> tuple[Model, dict[str, Any]]:
    """The model a description stands for; with GGUF metadata (MLX's reading) for its
    vocabulary, or {} for a folder. `fuse=False` leaves q/k/v and gate/up apart."""
    if source.format == "gguf":
        from .gguf_weights import load_gguf

        return load_gguf(source, dtype, fuse)
    args = source.args
    weights = sanitize(read_safetensors(source.files), args)
    return build_model(args, weights, source.quantization, str(source.path), dtype, fuse), {}


def load_tokenizer(source: ModelSource, metadata: dict[str, Any]) -> Tokenizer:
    if source.format == "gguf":
        from ..text.gguf_vocab import load_gguf_tokenizer

        return load_gguf_tokenizer(source.path, metadata)
    if source.vocabulary == "none":
        raise TokenizerError(f"{source.path}: no tokenizer.model or tokenizer.json in the "
                             "folder; copy the model's tokenizer files into it")
    return load_folder_tokenizer(source.path)


def load(path_or_repo: str | Path | None = None, tokenizer: bool = True, force: bool = False,
         dtype: str | mx.Dtype | None = None, group: mx.distributed.Group | None = None,
         pipeline: bool = False, max_memory: int | str | None = None,
         context: int | None = None, expert_policy: str = "lru", prefetch: bool = True
         ) -> tuple[Model, Tokenizer | None]:
    """(model, tokenizer) from a GGUF file, a model folder, a Hugging Face repo id or
    `ollama:NAME`; with no name, the default model (as the command line picks it).

    Weights stay memory-mapped until first used; `tokenizer=False` skips the tokenizer.
    `dtype` ("float32", "float16", "bfloat16") overrides the backend's choice (float32 on the
    CPU backend, the checkpoint's own on Metal). A model larger than the available memory
    raises `MemoryLimitError` unless `force`.

    `max_memory` (bytes, or "12GB"): run within this budget. A Mixtral larger than it keeps
    its other weights, a KV cache for at least `context` tokens (default 2048) and some experts
    per layer in memory, and reads the others from its safetensors files when the router picks
    them (`expert_policy` "lru" or "lfu"; `prefetch` guesses the next layer's). The plan is
    `model.memory_plan`; a budget too small raises `MemoryLimitError` with the minimum.

    `group`: an `mx.distributed` group of several ranks (under `mlx.launch`): the model is split
    over them, by layers with `pipeline`, else tensor parallel; each rank reads only its part."""
    source = describe(resolve(path_or_repo or default_model()))
    ranks = group.size() if group is not None else 1
    check_world(source.args, ranks, pipeline)  # before anything is read
    if max_memory is None:
        check_fits(source, force, dtype, ranks)
        model, metadata = build(source, dtype, fuse=ranks == 1)
    else:
        if ranks > 1:
            raise MemoryLimitError("max_memory does not combine with mlx.launch yet; split "
                                   "the model over the ranks, or stream it on one machine",
                                   params=("max_memory",))
        plan = plan_memory(source, budget_bytes(max_memory), dtype, context)
        if plan.streaming:
            from .streaming import build_streaming

            model, metadata = build_streaming(source, plan, dtype, expert_policy, prefetch), {}
        else:
            model, metadata = build(source, dtype)
        model.memory_plan = plan
        model.max_context = plan.context_limit
    if ranks > 1:  # still lazy: the split decides what is read
        model.model.pipeline(group) if pipeline else model.shard(group)
        model.fuse()  # after the split: fusing first would read whole tensors to cut them
    return model, (load_tokenizer(source, metadata) if tokenizer else None)


def budget_bytes(max_memory: int | str) -> int:
    """A budget in bytes from an int or a size like "12GB"."""
    if isinstance(max_memory, int) and not isinstance(max_memory, bool):
        if max_memory <= 0:
            raise MemoryLimitError(f"max_memory must be more than 0, got {max_memory}",
                                   params=("max_memory",))
        return max_memory
    try:
        return parse_size(str(max_memory))
    except ValueError as e:
        raise MemoryLimitError(f"max_memory: {e}", params=("max_memory",)) from None


def load_model(folder: str | Path, lazy: bool = True,
               dtype: str | mx.Dtype | None = None) -> Model:
    """Build a `Model` from a folder with `config.json` and safetensors weights (or a GGUF)."""
    model, _ = build(describe(Path(folder)), dtype)
    if not lazy:
        mx.eval(model.parameters())
    return model
