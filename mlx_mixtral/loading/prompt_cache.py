"""Prompt-cache files: a KV cache saved as safetensors plus metadata, as mlx-lm saves its own.

A file holds each layer's keys and values (quantized ones as their three arrays), the cache
classes and their `meta_state`, the token ids the cache holds, a fingerprint of the model that
computed it, and the caller's metadata. Files come from disk and may be damaged or belong to
another model: every check happens before a cache is built, and each failure is one
`PromptCacheError` line. Writing is atomic (a hidden file renamed at the end). A file is
safetensors whatever its name ends in (`cache.bin` reads back as it was written).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..errors import PromptCacheError, WeightsError
from ..model.cache import CACHE_CLASSES, parts
from ..model.decoder import Model
from .safetensors_file import check_safetensors

FORMAT = "mlx-mixtral-prompt-cache"
VERSION = "1"
_KINDS = ("keys", "values")


def model_fingerprint(model: Model) -> str:
    """What tells models apart: the configuration and the first rows of the embedding."""
    embed = model.model.embed_tokens
    rows = [embed[name][:2] for name in ("weight", "scales", "biases") if name in embed]
    mx.eval(rows)
    digest = hashlib.sha256(json.dumps(model.args.to_dict(), sort_keys=True).encode())
    for row in rows:
        digest.update(bytes(memoryview(row.astype(mx.float32) if row.dtype == mx.bfloat16
                                       else row)))
    return digest.hexdigest()[:16]


def save_prompt_cache(path: str | Path, cache: list, metadata: dict[str, str] | None = None,
                      *, model: Model | None = None, tokens: list[int] | None = None) -> None:
    """Write `cache` (with the `tokens` it holds and `model`'s fingerprint) to `path`.

    mlx-lm's call shape, `save_prompt_cache(path, cache, metadata)`, works too: each layer's
    positions are in the file either way, so it loads back as it was; without `tokens` the
    file cannot tell which prompt it continues (its metadata's "tokens" is then None)."""
    path = Path(path)
    refuse_folder(path)
    held = cache[0].offset if cache else 0
    if tokens is not None and len(tokens) != held:  # (else the load blames the file)
        raise PromptCacheError(f"save_prompt_cache: tokens has {len(tokens)} ids but the cache "
                               f"holds {held} positions; give the tokens the cache was filled "
                               "with")  # (no params: the command line never passes tokens)
    tensors: dict[str, mx.array] = {}
    for i, c in enumerate(cache):
        if c.empty():
            continue
        for kind, buffer in zip(_KINDS, c.state, strict=True):
            for j, x in enumerate(parts(buffer)):
                tensors[f"{i}.{kind}.{j}"] = x
    meta = {
        "format": FORMAT, "version": VERSION,
        "classes": json.dumps([type(c).__name__ for c in cache]),
        "meta_states": json.dumps([list(c.meta_state) for c in cache]),
        "tokens": json.dumps(None if tokens is None else list(tokens)),
        "model": model_fingerprint(model) if model is not None else "",
        "metadata": json.dumps(metadata or {}),
    }
    # mx.save_safetensors adds ".safetensors" to a name without it: the hidden name has it,
    # and the rename gives the file the name asked for, whatever it ends in.
    partial = path.parent / f".{path.name}.partial-{os.getpid()}.safetensors"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.touch()  # (MLX's error says only that it failed: this one says why)
        mx.save_safetensors(str(partial), tensors, metadata=meta)
        os.replace(partial, path)
    except (OSError, RuntimeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise PromptCacheError(f"{path}: cannot save the prompt cache there ({why})") from None
    finally:
        with contextlib.suppress(OSError):  # (tidying up must not hide why the save failed)
            partial.unlink(missing_ok=True)


def refuse_folder(path: Path) -> None:
    """A prompt cache is a file: a folder (or a path under a file) cannot hold one."""
    if path.is_dir():
        raise PromptCacheError(f"{path} is a folder; a prompt cache is a file (for example "
                               f"{path / 'prompt-cache.safetensors'})")
    if any(parent.exists() and not parent.is_dir() for parent in path.parents):
        raise PromptCacheError(f"{path}: a folder on this path is a file; a prompt cache "
                               "cannot be saved there")


def _json(meta: dict[str, str], key: str, kind: type, path: Path) -> Any:
    try:
        value = json.loads(meta[key])
    except (KeyError, TypeError, ValueError):
        raise PromptCacheError(f"{path}: the prompt cache's {key!r} entry is missing or "
                               "damaged; delete the file") from None
    if not isinstance(value, kind):
        raise PromptCacheError(f"{path}: the prompt cache's {key!r} entry is damaged; "
                               "delete the file")
    return value


def _layer(i: int, name: str, meta_state: list, arrays: dict[str, mx.array],
           path: Path) -> Any:
    cls = CACHE_CLASSES.get(name)
    if cls is None or not all(isinstance(m, str) for m in meta_state):
        raise PromptCacheError(f"{path}: layer {i} has an unknown cache kind {name!r}")
    state = []
    for kind in _KINDS:
        found = [arrays[f"{i}.{kind}.{j}"] for j in range(3) if f"{i}.{kind}.{j}" in arrays]
        if len(found) not in (0, 1, 3) or any(x.ndim != 4 for x in found):
            raise PromptCacheError(f"{path}: layer {i}'s {kind} are damaged; delete the file")
        state.append(found[0] if len(found) == 1 else tuple(found) if found else None)
    try:
        cache = cls.from_state(tuple(state) if state[0] is not None else [], tuple(meta_state))
    except (ValueError, TypeError, IndexError) as e:
        raise PromptCacheError(f"{path}: layer {i} is damaged ({e}); delete the file") from None
    held = 0 if cache.keys is None else parts(cache.keys)[0].shape[2]
    quantized = isinstance(cache.keys, tuple)
    expected = min(cache.offset, getattr(cache, "ring", cache.offset))
    if (cache.offset < 0 or held != expected or quantized != (cache.bits is not None)
            or (quantized and (cache.bits not in (2, 3, 4, 5, 6, 8)
                               or cache.group_size not in (32, 64, 128)))):
        raise PromptCacheError(f"{path}: layer {i}'s positions disagree with its data; "
                               "delete the file")
    return cache


# A file that is not (or no longer) ours may be anything the user keeps: not "delete it".
NOT_OURS = "give another path, or delete the file if it was a prompt cache"


def load_prompt_cache(path: str | Path, return_metadata: bool = False,
                      model: Model | None = None) -> Any:
    """The cache saved in `path` (and its metadata, with "tokens" and "model" added, if
    `return_metadata`; "tokens" is None for a file saved without them). With `model`, a file
    computed by another model is refused."""
    path = Path(path)
    refuse_folder(path)
    try:
        check_safetensors(path)
        # The format named: mx.load would guess it from the extension and refuse "cache.bin".
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except WeightsError as e:
        raise PromptCacheError(str(e).replace("download it again", NOT_OURS)) from None
    except (OSError, RuntimeError, ValueError) as e:
        raise PromptCacheError(f"{path}: not a readable prompt cache ({e}); {NOT_OURS}") \
            from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise PromptCacheError(f"{path}: not an mlx-mixtral prompt cache (version "
                               f"{VERSION}); {NOT_OURS}")
    classes = _json(meta, "classes", list, path)
    meta_states = _json(meta, "meta_states", list, path)
    tokens = _json(meta, "tokens", (list, type(None)), path)
    metadata = _json(meta, "metadata", dict, path)
    if len(classes) != len(meta_states) or not all(isinstance(t, int) for t in tokens or []):
        raise PromptCacheError(f"{path}: the prompt cache is damaged; delete the file")
    if model is not None:
        if not meta.get("model"):
            raise PromptCacheError(f"{path}: this prompt cache does not record the model that "
                                   "computed it (save_prompt_cache(..., model=model) does); "
                                   "delete it or use another file")
        if len(classes) != len(model.layers) or meta.get("model") != model_fingerprint(model):
            raise PromptCacheError(f"{path}: this prompt cache was computed by another model; "
                                   "delete it or use another file")
    cache = [_layer(i, name, list(m), arrays, path)
             for i, (name, m) in enumerate(zip(classes, meta_states, strict=True))]
    if (any(c.offset != cache[0].offset for c in cache)
            or (cache and tokens is not None and len(tokens) != cache[0].offset)):
        raise PromptCacheError(f"{path}: the prompt cache's layers disagree; delete the file")
    if return_metadata:
        return cache, {**metadata, "tokens": tokens, "model": meta.get("model", "")}
    return cache
