"""A conversation as Markdown or JSON, with its times and numbers.

A system prompt set after the chat began is shown where it was set: the replies before it were
generated without it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .store import SavedChat


def _when(t: float | None) -> str | None:
    return None if not t else time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def system_position(c: SavedChat) -> int:
    """How many messages came before the system prompt was set (0: it applied from the
    start)."""
    if not c.system or c.system_set is None:
        return 0
    return sum(1 for m in c.messages if m.created and m.created < c.system_set)


def to_markdown(c: SavedChat) -> str:
    lines = [f"# {c.title}", "", f"*Model: {c.model} · started {_when(c.created)}*", ""]
    system_at = system_position(c)
    for i, m in enumerate([*c.messages, None]):
        if c.system and i == system_at:
            where = "" if i == 0 else f" (set after {i} messages, at {_when(c.system_set)})"
            lines += [f"**System prompt{where}:**", "", c.system, ""]
        if m is None:
            break
        who = "You" if m.role == "user" else "Assistant"
        note = {"stopped": " *(stopped)*", "streaming": " *(interrupted)*"}.get(m.status, "")
        lines += [f"**{who}:**{note}", "", m.content, ""]
    return "\n".join(lines)


def to_json(c: SavedChat) -> str:
    return json.dumps({
        "title": c.title,
        "model": c.model,
        "created": _when(c.created),
        "updated": _when(c.updated),
        "system": c.system,
        "system_set": _when(c.system_set),
        "system_applies_from_message": system_position(c),
        "settings": c.settings,
        "messages": [{"role": m.role, "content": m.content, "status": m.status,
                      "created": _when(m.created), "stats": m.stats}
                     for m in c.messages],
    }, indent=2, ensure_ascii=False)


def _free_stem(folder: Path, stem: str) -> str:
    """`stem`, or stem-2, stem-3 ...: the first for which neither file exists yet."""
    candidate, n = stem, 1
    while (folder / f"{candidate}.md").exists() or (folder / f"{candidate}.json").exists():
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def export(c: SavedChat, folder: Path) -> tuple[Path, Path]:
    """Write chat-<id>-<date-time>.md and .json into `folder`, never over an earlier export;
    return both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = _free_stem(folder, f"chat-{c.id}-{time.strftime('%Y%m%d-%H%M%S')}")
    md, js = folder / f"{stem}.md", folder / f"{stem}.json"
    with md.open("x", encoding="utf-8") as f:
        f.write(to_markdown(c))
    with js.open("x", encoding="utf-8") as f:
        f.write(to_json(c))
    return md, js
