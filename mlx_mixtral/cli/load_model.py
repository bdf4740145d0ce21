"""Loading the model a command names, saying on stderr what happens."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..loading.load_plan import LoadPlan

# What a user of the command line does about the library's choice to page experts (after its note).
PAGING_REMEDY = "(--max-memory sets the budget, --force loads it whole)"


def plan_for_cli(name: str | None, force: bool = False, dtype: str | None = None, group=None,
                 pipeline: bool = False, max_memory: str | None = None, reserve: int = 0,
                 shrink: bool = False, read_threads: int | None = None,
                 draft=None) -> LoadPlan:
    """The load plan of the named (or default) model: a missing file, a world the model cannot
    be split into, a budget that is not a size or too small, a model too big even to page:
    one line before anything loads. A Mixtral larger than the available memory, with no
    --max-memory, pages its experts within it: one line says so. `draft`: drafted decoding's
    `DraftNeeds`, counted inside the budget."""
    from ..loading import plan_load

    plan = plan_load(name, force=force, dtype=dtype, group=group, pipeline=pipeline,
                     max_memory=max_memory, reserve=reserve, shrink=shrink,
                     read_threads=read_threads, draft=draft)
    if plan.note is not None:
        print(f"{plan.note} {PAGING_REMEDY}", file=sys.stderr, flush=True)
    return plan


def load_from_plan(plan: LoadPlan):
    """(model, tokenizer) as `plan` says, saying so on stderr (under mlx.launch rank 0 speaks
    for all)."""
    from ..loading import load_planned

    group = plan.group
    if group is None or group.rank() == 0:
        split = "" if group is None else (
            f" over {group.size()} ranks ({'pipeline' if plan.pipeline else 'tensor parallel'})")
        print(f"Loading {plan.name}{split} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_planned(plan)
    if plan.memory is not None:  # each rank's own, for its share
        rank = "" if group is None else f"rank {group.rank()}: "
        print(f"{rank}{plan.memory}", file=sys.stderr, flush=True)
    return model, tokenizer


def load_model_for_cli(name: str | None, force: bool = False, dtype: str | None = None,
                       group=None, pipeline: bool = False, max_memory: str | None = None):
    """Plan, then load the named (or default) model (split over the ranks of `group` under
    mlx.launch)."""
    return load_from_plan(plan_for_cli(name, force, dtype, group, pipeline, max_memory))
