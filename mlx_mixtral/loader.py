"""`load(path_or_repo)`: a model and its tokenizer from whatever form the user has.

- a `.gguf` file (llama architecture: Mistral, Mixtral, SmolLM2 ...);
- a folder: Hugging Face safetensors, our converted MLX folders, mlx-community folders;
- a Hugging Face repo id, fetched through huggingface-hub (its cache and progress bar).
"""

from __future__ import annotations

from pathlib import Path

from .errors import WeightsError
from .gguf_weights import load_gguf
from .model import Model
from .tokenizer import Tokenizer, load_folder_tokenizer, load_gguf_tokenizer
from .weights import PICKLE_SUFFIXES, load_model

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


def resolve(path_or_repo: str | Path) -> Path:
    """A local file or folder for what the user named."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    if _looks_like_repo_id(str(path_or_repo)):
        return download(str(path_or_repo))
    raise WeightsError(f"{path_or_repo}: no such file or folder (nor a Hugging Face repo id "
                       "like mistralai/Mixtral-8x7B-Instruct-v0.1)")


def load(path_or_repo: str | Path, tokenizer: bool = True) -> tuple[Model, Tokenizer | None]:
    """(model, tokenizer) from a GGUF file, a model folder or a Hugging Face repo id.

    Weights stay memory-mapped until first used; `tokenizer=False` skips the tokenizer."""
    path = resolve(path_or_repo)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise WeightsError(f"{path}: pickled weights are refused (unpickling can run code); "
                               "use the model's safetensors or GGUF files")
        if path.suffix != ".gguf":
            raise WeightsError(f"{path}: not a GGUF file; give a .gguf file or a model folder")
        model, metadata = load_gguf(path)
        return model, (load_gguf_tokenizer(path, metadata) if tokenizer else None)
    model = load_model(path)
    return model, (load_folder_tokenizer(path) if tokenizer else None)
