"""The models this machine has, for `mlx-mixtral list` and the app's model picker:

- MLX and Hugging Face folders in the Hugging Face cache (by repo id);
- models pulled with Ollama (`ollama:NAME:TAG`);
- folders and GGUF files we have seen: `convert` outputs and models the app loaded;
- the offline demo model.

Each is described from its headers only, so a listing reads no weights. Anything that is not
a model we can load (an image model in the cache, a deleted folder) is left out.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import MlxMixtralError
from ..user_files import data_dir, write_json
from .summary import fit, summarize

SEEN_FILE = "models-seen.json"
MAX_SEEN = 50


@dataclass(frozen=True)
class LocalModel:
    """A model in the list: its name and origin, and the sizes of its `ModelSummary`."""

    name: str  # what the model parameter takes
    origin: str  # "demo", "hugging face", "ollama", "local"
    disk_bytes: int
    memory_bytes: int  # once loaded, from the headers
    page_bytes: int | None = None  # the least memory it runs in, its experts paged

    def fit(self, available: int) -> str:
        """One of "fits", "pages", "too big" in `available` bytes (see `summary.fit`)."""
        return fit(self.memory_bytes, self.page_bytes, available)

    @property
    def label(self) -> str:
        """A short name for lists: a repo id or tag as is, a path by its last part."""
        if self.origin in ("hugging face", "ollama"):
            return self.name
        return Path(self.name).name


def _described(name: str, path: Path, origin: str) -> LocalModel | None:
    from ..loading.source import describe

    try:
        s = summarize(describe(path))
    except (MlxMixtralError, OSError, ValueError):
        return None
    return LocalModel(name, origin, s.disk_bytes, s.memory_bytes, s.page_bytes)


def hub_cache_models(cache_dir: Path | None = None) -> list[LocalModel]:
    """Model repos in the Hugging Face cache whose newest snapshot we can load."""
    from huggingface_hub import constants, scan_cache_dir

    try:  # (the constant read now: scan_cache_dir's own default was fixed at its import)
        cache = scan_cache_dir(cache_dir or constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001 - no cache yet, or one we cannot read
        return []
    found = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        newest = max(repo.revisions, key=lambda r: r.last_modified)
        model = _described(repo.repo_id, Path(newest.snapshot_path), "hugging face")
        if model is not None:
            found.append(model)
    return found


def _ollama_name(parts: tuple[str, ...]) -> str:
    """manifests/<host>/<namespace>/<model>/<tag> -> the name `ollama:` takes."""
    host, namespace, model, tag = parts
    if host == "registry.ollama.ai":
        model = model if namespace == "library" else f"{namespace}/{model}"
    else:
        model = f"{host}/{namespace}/{model}"
    return f"ollama:{model}:{tag}"


def ollama_models() -> list[LocalModel]:
    from ..loading.ollama_store import ollama_model, ollama_store

    manifests = ollama_store() / "manifests"
    found = []
    for manifest in sorted(manifests.glob("*/*/*/*")) if manifests.is_dir() else []:
        name = _ollama_name(manifest.relative_to(manifests).parts)
        try:
            path = ollama_model(name.removeprefix("ollama:"))
        except MlxMixtralError:
            continue
        model = _described(name, path, "ollama")
        if model is not None:
            found.append(model)
    return found


def _seen_path() -> Path:
    return data_dir() / SEEN_FILE


def seen_paths() -> list[str]:
    try:
        data = json.loads(_seen_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    paths = data.get("paths") if isinstance(data, dict) else None
    return [p for p in paths if isinstance(p, str)] if isinstance(paths, list) else []


def remember(path: str | Path) -> None:
    """Note a local model folder or GGUF file (a `convert` output, a model the app loaded), so
    that the model list offers it again."""
    from ..loading.locate import DEMO_NAME, model_identity

    path = model_identity(str(path))
    if path == DEMO_NAME:  # listed as the demo already
        return
    paths = [path, *(p for p in seen_paths() if p != path)][:MAX_SEEN]
    with contextlib.suppress(OSError):  # a read-only data folder costs only the list entry
        write_json(_seen_path(), {"paths": paths})


def seen_models() -> list[LocalModel]:
    """The folders and files `remember` noted, as they are now: the demo's file (noted before
    it was named "demo") is left to `demo_models`."""
    from ..loading.locate import DEMO_NAME, model_identity

    found = []
    for p in seen_paths():
        known = Path(p).exists() and model_identity(p) != DEMO_NAME
        model = _described(p, Path(p), "local") if known else None
        if model is not None:
            found.append(model)
    return found


def demo_models() -> list[LocalModel]:
    from ..demo import demo_model_path
    from ..loading.locate import DEMO_NAME

    path = demo_model_path()
    model = _described(DEMO_NAME, path, "demo") if path is not None else None
    return [model] if model is not None else []


def local_models(hub_cache: Path | None = None) -> list[LocalModel]:
    """Every model this machine has, each once (by `model_identity`): local folders first,
    then the Hugging Face cache, Ollama, and the demo."""
    from ..loading.locate import model_identity

    models, names = [], set()
    for model in [*seen_models(), *hub_cache_models(hub_cache), *ollama_models(),
                  *demo_models()]:
        name = model_identity(model.name)
        if name not in names:
            names.add(name)
            models.append(model)
    return models
