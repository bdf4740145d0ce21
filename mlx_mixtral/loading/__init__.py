"""Loading: what the user named (paths, repo ids, `ollama:`, the default and demo model),
described from its headers (safetensors folders, GGUF files), planned once (the distributed
world, memory: resident, experts paged, or refused), and built into a model with its
tokenizer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    "LoadPlan": "load_plan",
    "plan_load": "load_plan",
    "draft_needs": "load_plan",
    "build": "loader",
    "load": "loader",
    "load_model": "loader",
    "load_planned": "loader",
    "default_model": "locate",
    "resolve": "locate",
    "ModelSource": "source",
    "describe": "source",
}
__all__ = ["LoadPlan", "ModelSource", "build", "default_model", "describe", "draft_needs", "load",
           "load_model", "load_planned", "plan_load", "resolve"]

if TYPE_CHECKING:
    from .load_plan import LoadPlan, draft_needs, plan_load
    from .loader import build, load, load_model, load_planned
    from .locate import default_model, resolve
    from .source import ModelSource, describe

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
