"""Loading: what the user named (paths, repo ids, `ollama:`, the default and demo model),
described from its headers (safetensors folders, GGUF files), checked against memory, and built
into a model with its tokenizer."""

from .load import build, load, load_model
from .resolve import default_model, resolve
from .source import ModelSource, describe

__all__ = ["ModelSource", "build", "default_model", "describe", "load", "load_model",
           "resolve"]
