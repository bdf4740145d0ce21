"""How big the prefix store is and where it lives: one place for its defaults.

RAM: 2 GB or an eighth of the machine's memory, whichever is less (within `--max-memory` the
caller gives the share its plan leaves). Disk: 32 GB or a tenth of the free space, whichever is
less. The folder is in the user's data folder ($MLX_MIXTRAL_DATA_DIR moves it)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..generation.kv import PROMPT_CACHE_BYTES
from .folder import DEFAULT_BLOCK

if TYPE_CHECKING:
    from ..model.decoder import Model
    from .store import PrefixStore

DISK_BYTES = 32 * 10**9
MAX_BLOCK = 1 << 16


@dataclass(frozen=True)
class StoreSettings:
    block: int = DEFAULT_BLOCK  # tokens per block
    ram: int | None = None  # bytes (None: the default)
    disk: int | None = None  # bytes (None: the default; 0: no disk tier)
    folder: Path | None = None  # None: the user's data folder


def store_folder() -> Path:
    from ..user_files import data_dir

    return data_dir() / "prefixes"


def default_ram() -> int:
    from ..loading.memory import machine_memory

    memory = machine_memory()
    return min(PROMPT_CACHE_BYTES, memory // 8) if memory else PROMPT_CACHE_BYTES


def default_disk(folder: Path) -> int:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return 0
    return min(DISK_BYTES, free // 10)


def model_key(model: Model, part: str = "") -> str:
    """What tells this model's blocks from others': its fingerprint, and `part` (e.g.
    "rank 1 of 2") when several processes each hold a part of it."""
    from ..loading.prompt_cache import model_fingerprint

    return model_fingerprint(model) + (f" {part}" if part else "")


def open_store(model: Model, settings: StoreSettings | None = None, name: str = "",
               part: str = "") -> PrefixStore:
    """The store for `model` (`name`: how `mlx-mixtral cache` shows it)."""
    from .store import PrefixStore  # (MLX and the caches: not for a listing of the folder)

    settings = settings or StoreSettings()
    folder = settings.folder or store_folder()
    ram = default_ram() if settings.ram is None else settings.ram
    disk = default_disk(folder) if settings.disk is None else settings.disk
    return PrefixStore(model_key(model, part), folder if disk > 0 else None, settings.block, ram,
                       disk, name)
