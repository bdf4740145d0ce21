"""Loading: what the user named (paths, repo ids, `ollama:`, the default and demo model),
described from its headers (safetensors folders, GGUF files), checked against memory, and built
into a model with its tokenizer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    "build": "loader",
    "load": "loader",
    "load_model": "loader",
    "default_model": "locate",
    "resolve": "locate",
    "ModelSource": "source",
    "describe": "source",
}
__all__ = ["ModelSource", "build", "default_model", "describe", "load", "load_model", "resolve"]

if TYPE_CHECKING:
    from .loader import build, load, load_model
    from .locate import default_model, resolve
    from .source import ModelSource, describe

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
