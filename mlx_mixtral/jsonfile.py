"""Reading a JSON object from an untrusted file: one reader for configs, tokenizer configs and
the user's settings, each failure a one-line error of the caller's type."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import MlxMixtralError


def read_json_object(path: Path, error: type[MlxMixtralError],
                     remedy: str = "") -> dict[str, Any]:
    """The JSON object in `path`; `error` when it is unreadable, not JSON, or not an object."""
    hint = f"; {remedy}" if remedy else ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e}){hint}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}){hint}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object{hint}")
    return data
