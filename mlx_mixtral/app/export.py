"""A conversation as Markdown or JSON."""

from __future__ import annotations

import json
from pathlib import Path

from .store import Conversation


def to_markdown(c: Conversation) -> str:
    lines = [f"# {c.title}", "", f"*Model: {c.model}*", ""]
    if c.system:
        lines += ["**System:**", "", c.system, ""]
    for m in c.messages:
        who = "You" if m.role == "user" else "Assistant"
        note = {"stopped": " *(stopped)*", "streaming": " *(interrupted)*"}.get(m.status, "")
        lines += [f"**{who}:**{note}", "", m.content, ""]
    return "\n".join(lines)


def to_json(c: Conversation) -> str:
    return json.dumps({
        "title": c.title,
        "model": c.model,
        "system": c.system,
        "settings": c.settings,
        "messages": [{"role": m.role, "content": m.content, "status": m.status}
                     for m in c.messages],
    }, indent=2, ensure_ascii=False)


def export(c: Conversation, folder: Path) -> tuple[Path, Path]:
    """Write chat-<id>.md and chat-<id>.json into `folder`; return both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    md, js = folder / f"chat-{c.id}.md", folder / f"chat-{c.id}.json"
    md.write_text(to_markdown(c), encoding="utf-8")
    js.write_text(to_json(c), encoding="utf-8")
    return md, js
