"""The user's own files: the config (`{"model": ...}` and the first-run choice) and the data
folder (conversations, saved KV caches, the models seen), and the cache folder.
$MLX_MIXTRAL_CONFIG_DIR, $MLX_MIXTRAL_DATA_DIR and $MLX_MIXTRAL_CACHE_DIR move them; tests use
all three so that they never touch the user's."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .jsonfile import read_json_object

CONFIG_REMEDY = 'write it as a JSON object like {"model": "..."}'


def config_file() -> Path:
    from platformdirs import user_config_dir

    folder = os.environ.get("MLX_MIXTRAL_CONFIG_DIR") or user_config_dir("mlx-mixtral")
    return Path(folder) / "config.json"


def data_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(os.environ.get("MLX_MIXTRAL_DATA_DIR") or user_data_dir("mlx-mixtral"))


def cache_dir() -> Path:
    """$MLX_MIXTRAL_CACHE_DIR, else the platform's user cache folder: what can be built again
    (bench's models, the folders standing for Ollama's safetensors models)."""
    from platformdirs import user_cache_dir

    return Path(os.environ.get("MLX_MIXTRAL_CACHE_DIR") or user_cache_dir("mlx-mixtral"))


def user_config() -> dict[str, Any]:
    """The config file's settings ({} when there is none)."""
    path = config_file()
    return read_json_object(path, ConfigError, CONFIG_REMEDY) if path.is_file() else {}


def write_json(path: Path, data: Any, indent: int | None = 2) -> None:
    """Write `data` as JSON atomically: a crash leaves the old file or the new, never half.
    `indent=None`: compact, for large data (routing traces)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")  # one per writer
    try:
        partial.write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n",
                           encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def update_user_config(**values: Any) -> Path:
    """Set these keys in the config file, keeping the others; return its path."""
    path = config_file()
    write_json(path, {**user_config(), **values})
    return path


def writer_alive(pid: int) -> bool:
    """Whether process `pid` (which named a partial file or folder after itself) still runs:
    what a dead writer left may be deleted."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
