"""The store's folder as files: one folder per space (a model, block size, KV dtype and
quantization), holding its `space.json` and one file per block. Read and cleared here without
MLX or a model, for `mlx-mixtral cache`: a listing must not cost a model's load."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_BLOCK = 256  # tokens per block (--cache-block)
SPACE_FILE = "space.json"  # what the space's blocks are: model, name, block, dtype, bits
BLOCK_SUFFIX = ".block"


@dataclass(frozen=True)
class SpaceFiles:
    """One space folder as found on disk; `about` is its space.json ({} when missing or
    unreadable: its blocks still count, and are cleared with the rest)."""

    folder: Path
    about: dict[str, Any]
    blocks: int
    nbytes: int

    @property
    def model(self) -> str:
        return str(self.about.get("model", "?"))

    @property
    def name(self) -> str:
        return str(self.about.get("name") or "") or "(unnamed)"

    @property
    def kv(self) -> str:
        """How keys and values are kept: "float16", "8-bit (group 64)", ..."""
        bits = self.about.get("bits")
        if bits is None:
            return str(self.about.get("dtype", "?")).removeprefix("mlx.core.")
        return f"{bits}-bit (group {self.about.get('group_size', '?')})"

    def matches(self, name: str) -> bool:
        """Whether the user's NAME means this space's model: its name as recorded, or its
        fingerprint (or the fingerprint's beginning, as `cache` shows it)."""
        return name == self.name or (len(name) >= 6 and self.model.startswith(name))

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "block": self.about.get("block"),
                "dtype": self.about.get("dtype"), "bits": self.about.get("bits"),
                "group_size": self.about.get("group_size"), "blocks": self.blocks,
                "bytes": self.nbytes, "folder": str(self.folder)}


def _about(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / SPACE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def spaces(root: Path) -> list[SpaceFiles]:
    """Every space folder under `root` (the store's folder), by name then folder."""
    found = []
    if not root.is_dir():
        return found
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        sizes = []
        for path in folder.glob(f"*{BLOCK_SUFFIX}"):
            with contextlib.suppress(OSError):
                sizes.append(path.stat().st_size)
        found.append(SpaceFiles(folder, _about(folder), len(sizes), sum(sizes)))
    return sorted(found, key=lambda s: (s.name, str(s.folder)))


def clear_space(space: SpaceFiles) -> tuple[int, int]:
    """Delete the space's blocks and its description: (blocks, bytes) freed. A process that
    still runs with this model writes its description again with its next block."""
    blocks = freed = 0
    for path in space.folder.glob(f"*{BLOCK_SUFFIX}"):
        with contextlib.suppress(OSError):
            size = path.stat().st_size
            path.unlink()
            blocks, freed = blocks + 1, freed + size
    (space.folder / SPACE_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        space.folder.rmdir()  # only when empty: a writer's partial file keeps it
    return blocks, freed
