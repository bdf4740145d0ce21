"""The load policy, decided once: from what the user named to the model that will be built.

resolve the name -> describe it (its headers, read once) -> check the distributed world it
will be split over -> check it fits: resident, with its experts paged within a budget (the
one given, or, for a Mixtral larger than the memory available, that memory), or refused with
`MemoryLimitError` before anything is read. The Python API's `load`, the command line, the chat
app and the server all build this plan; `loader.load_planned` builds what it says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..model.expert_cache import DEFAULT_READ_THREADS, check_read_threads
from ..model.precision import target_dtype
from ..model.sharding import check_world
from ..units import size
from .locate import default_model, resolve
from .memory import check_fits, load_bytes
from .memory_plan import DraftNeeds, MemoryPlan, automatic_plan, budget_bytes, plan_memory
from .rank_loader import plan_ranks
from .source import ModelSource, describe, require_vocabulary


@dataclass(frozen=True)
class LoadPlan:
    name: str  # as the user named it (or the default model)
    source: ModelSource  # its description, the only reading of its headers
    dtype: str | mx.Dtype | None  # None: the backend's choice (model/precision.py)
    group: mx.distributed.Group | None = None  # ranks to split the model over
    pipeline: bool = False  # split by layers, not tensor parallel
    memory: MemoryPlan | None = None  # a budget's plan; None: resident, no budget
    automatic: bool = False  # the budget is the memory available: the model did not fit
    read_threads: int = DEFAULT_READ_THREADS  # threads reading paged experts

    @property
    def ranks(self) -> int:
        return self.group.size() if self.group is not None else 1

    @property
    def paging(self) -> bool:
        """Whether the experts are paged from disk into slots."""
        return self.memory is not None and self.memory.paging

    @property
    def note(self) -> str | None:
        """The one line to tell the user when the library chose to page; the front end
        adds how its user changes that (a budget, loading the model whole)."""
        if not self.automatic or self.memory is None:
            return None
        return (f"{self.source.path.name} is larger than the {size(self.memory.budget)} of "
                "memory available: its experts will be read from disk as chosen")


def plan_load(name: str | Path | None = None, *, force: bool = False,
              dtype: str | mx.Dtype | None = None, group: mx.distributed.Group | None = None,
              pipeline: bool = False, max_memory: int | str | None = None,
              context: int | None = None, page_experts: bool = True,
              reserve: int = 0, shrink: bool = False, tokenizer: bool = True,
              draft: DraftNeeds | None = None, read_threads: int | None = None
              ) -> LoadPlan:
    """The plan for loading `name` (see the module doc and `loader.load` for the arguments);
    anything that cannot load is refused here, before a tensor is read. Within a budget,
    `reserve` bytes are kept aside for KV caches kept between requests (`shrink`: fewer if
    they do not fit, else refused; memory_plan.plan_memory), and `draft`'s share for drafted
    decoding (`draft_needs`). `tokenizer`: a folder without tokenizer files is refused too
    (last: a mistaken flag is named first). `read_threads`: the threads that read paged
    experts (default DEFAULT_READ_THREADS)."""
    threads = check_read_threads(DEFAULT_READ_THREADS if read_threads is None
                                 else read_threads)
    name = name or default_model()
    source = describe(resolve(name))
    ranks = group.size() if group is not None else 1
    check_world(source.args, ranks, pipeline)
    memory, automatic = None, False
    if max_memory is not None and ranks > 1:  # each rank within it, for its share
        memory = plan_ranks(source, budget_bytes(max_memory), ranks, group.rank(), pipeline,
                            dtype, context, reserve, shrink)
    elif max_memory is not None:
        memory = plan_memory(source, budget_bytes(max_memory), dtype, context, reserve, shrink,
                             draft)
    elif ranks > 1 or not page_experts:
        check_fits(source, force, dtype, ranks)
    else:
        memory = automatic_plan(source, force, dtype, context, reserve, shrink, draft)
        automatic = memory is not None
    if tokenizer:
        require_vocabulary(source)
    return LoadPlan(str(name), source, dtype, group, pipeline, memory, automatic, threads)


def draft_needs(tokens: int, draft_model: str | Path | None = None,
                dtype: str | mx.Dtype | None = None) -> DraftNeeds:
    """What drafting `tokens` tokens per verify pass adds to a memory budget: with
    `draft_model` (named as for `load`), its weights and KV cache as `dtype` loads them; else
    prompt lookup, which has no model. Pass it as `load(..., draft=)`."""
    if draft_model is None:
        return DraftNeeds(tokens)
    source = describe(resolve(draft_model))
    kv = source.args.kv_bytes_per_token((target_dtype(dtype) or mx.float16).size)
    return DraftNeeds(tokens, str(draft_model), load_bytes(source, dtype), source.args, kv)
