"""`load()`: a model and its tokenizer from whatever form the user has, in one pass.

the load plan (load_plan.py: resolve, describe, check the world and the memory) -> build the
model it says (lazy, memory-mapped; its experts paged within a budget) -> its tokenizer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..demo import DEMO_NAME, is_demo
from ..model.decoder import Model
from ..model.limits import RuntimeLimits
from ..model.sharding import shard_layers, shard_tensors
from ..text.tokenizer import Tokenizer, load_folder_tokenizer
from .checkpoint import build_model, sanitize
from .expert_paging import build_paged
from .load_plan import LoadPlan, plan_load
from .memory_plan import DraftNeeds
from .rank_loader import build_rank
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
    return load_folder_tokenizer(source.path)


def load(path_or_repo: str | Path | None = None, tokenizer: bool = True, force: bool = False,
         dtype: str | mx.Dtype | None = None, group: mx.distributed.Group | None = None,
         pipeline: bool = False, max_memory: int | str | None = None,
         context: int | None = None, expert_policy: str = "lru", prefetch: bool = True,
         page_experts: bool = True, read_threads: int | None = None,
         draft: DraftNeeds | None = None
         ) -> tuple[Model, Tokenizer | None]:
    """(model, tokenizer) from a GGUF file, a model folder, a Hugging Face repo id or
    `ollama:NAME`; with no name, the default model (as the command line picks it).

    Weights stay memory-mapped until first used; `tokenizer=False` skips the tokenizer.
    `dtype` ("float32", "float16", "bfloat16") overrides the backend's choice (float32 on the
    CPU backend, the checkpoint's own on Metal).

    A Mixtral (safetensors, or a GGUF whose experts are Q4_0, Q4_1 or Q8_0) larger than the
    memory available pages its experts within that memory, and one line on stderr says so;
    with `page_experts=False`, or for a model that cannot be paged, it raises
    `MemoryLimitError` instead. `force` loads the model whole anyway.

    `max_memory` (bytes, or "12GB"): run within this budget. A Mixtral larger than it keeps
    its other weights, a KV cache for at least `context` tokens (default 2048) and some experts
    per layer in memory, and reads the others from its files when the router picks
    them (`expert_policy` "lru" or "lfu"; `prefetch` guesses the next layer's), with
    `read_threads` threads reading at once (default 8). The plan is `model.limits.memory_plan`;
    a budget too small raises `MemoryLimitError` with the minimum.
    Drafted decoding within the budget: `draft=draft_needs(k)` (prompt lookup) or
    `draft_needs(k, "draft-model")` counts the drafted tokens, and the draft model's weights
    and KV cache, inside it.

    `group`: an `mx.distributed` group of several ranks (under `mlx.launch`): the model is split
    over them, by layers with `pipeline`, else tensor parallel; each rank reads only its part
    (rank_loader.py). With `max_memory`, that is each rank's budget for its share.

    The same in two steps: `plan_load(...)` (load_plan.py), then `load_planned(plan)`."""
    plan = plan_load(path_or_repo, force=force, dtype=dtype, group=group, pipeline=pipeline,
                     max_memory=max_memory, context=context, page_experts=page_experts,
                     tokenizer=tokenizer, read_threads=read_threads, draft=draft)
    if plan.note is not None:
        print(f"{plan.note} (max_memory sets the budget, force=True loads it whole)",
              file=sys.stderr, flush=True)
    return load_planned(plan, tokenizer, expert_policy, prefetch)


def load_planned(plan: LoadPlan, tokenizer: bool = True, expert_policy: str = "lru",
                 prefetch: bool = True) -> tuple[Model, Tokenizer | None]:
    """(model, tokenizer) as `plan` says, its files' headers not read again."""
    source, memory = plan.source, plan.memory
    pager = None
    if plan.ranks > 1 and source.format == "safetensors":  # each rank reads its share alone
        built = build_rank(source, plan.group, plan.pipeline, plan.dtype,
                           memory if plan.paging else None, expert_policy, prefetch,
                           plan.read_threads)
        model, pager, metadata = built.model, built.pager, {}
    elif plan.paging:
        model, pager = build_paged(source, memory, plan.dtype, expert_policy, prefetch,
                                   plan.read_threads)
        metadata = {}
        if source.format == "gguf" and tokenizer:  # its vocabulary, read without the tensors
            from .gguf_file import read_gguf_vocabulary

            metadata = read_gguf_vocabulary(source.path)
    else:
        model, metadata = build(source, plan.dtype, fuse=plan.ranks == 1)
    if memory is not None:
        # Freed buffers MLX keeps count in RSS: no more than the plan leaves for them.
        mx.set_cache_limit(memory.cache_limit)
        model.limits = RuntimeLimits(
            max_context=memory.context_limit, memory_plan=memory, expert_pager=pager,
            max_prefill_step=memory.prefill_step if pager is not None else None)
    if plan.ranks > 1 and source.format != "safetensors":  # a GGUF: MLX reads, then cuts
        shard_layers(model.model, plan.group) if plan.pipeline else shard_tensors(model,
                                                                                 plan.group)
        model.fuse()  # after the split: fusing first would read whole tensors to cut them
    if is_demo(source.path):
        model.defaults_name = DEMO_NAME  # its gentler sampling defaults (generation/sampling.py)
    return model, (load_tokenizer(source, metadata) if tokenizer else None)


def load_model(folder: str | Path, lazy: bool = True,
               dtype: str | mx.Dtype | None = None) -> Model:
    """Build a `Model` from a folder with `config.json` and safetensors weights (or a GGUF)."""
    model, _ = build(describe(Path(folder)), dtype)
    if not lazy:
        mx.eval(model.parameters())
    return model
