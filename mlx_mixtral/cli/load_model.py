"""Loading the model a command names, saying on stderr what happens."""

from __future__ import annotations

import sys


def check_budget(name: str, max_memory: str | None, force: bool, dtype: str | None):
    """The model's memory plan within --max-memory, or None when it loads whole: a budget too
    small, or a model too big even to stream, ends in one line before anything loads. Without
    --max-memory, a Mixtral larger than the available memory streams its experts within it."""
    from ..loading import describe, resolve
    from ..loading.loader import budget_bytes
    from ..loading.memory_plan import automatic_plan, plan_memory
    from ..units import size

    source = describe(resolve(name))
    if max_memory is not None:
        return plan_memory(source, budget_bytes(max_memory), dtype)
    plan = automatic_plan(source, force, dtype)
    if plan is not None:
        print(f"{source.path.name} is larger than the {size(plan.budget)} of memory available: "
              "its experts will be read from disk as chosen (--max-memory sets the budget, "
              "--force loads it whole)", file=sys.stderr, flush=True)
    return plan


def load_model_for_cli(name: str | None, force: bool = False, dtype: str | None = None,
                       group=None, pipeline: bool = False, max_memory: str | None = None):
    """Load the named (or default) model, saying what is happening on stderr (split over the
    ranks of `group` under mlx.launch; rank 0 speaks for all)."""
    from ..loading import default_model, load

    name = name or default_model()
    if group is not None:  # a world the model cannot be split into: one line, nothing read
        from ..loading import describe, resolve
        from ..model.sharding import check_world

        check_world(describe(resolve(name)).args, group.size(), pipeline)
    else:  # a budget that is not a size or too small, a model too big: one line
        plan = check_budget(name, max_memory, force, dtype)
        max_memory = plan and plan.budget
    if group is None or group.rank() == 0:
        split = "" if group is None else (
            f" over {group.size()} ranks ({'pipeline' if pipeline else 'tensor parallel'})")
        print(f"Loading {name}{split} ...", file=sys.stderr, flush=True)
    model, tokenizer = load(name, force=force, dtype=dtype, group=group, pipeline=pipeline,
                            max_memory=max_memory)
    if model.memory_plan is not None:
        print(model.memory_plan, file=sys.stderr, flush=True)
    return model, tokenizer
