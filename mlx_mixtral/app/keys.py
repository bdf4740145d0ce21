"""The chat app's keys, in one table: the bindings, the footer, the help screen and the command
palette all read it.

The message box is a text area with its own editing keys (Ctrl+A/E/K/U/W/D/Y/Z, F6, F7), so the
app leaves those alone and uses others.
"""

from __future__ import annotations

KEYS = [  # (key, action, footer label, help text)
    ("enter", None, "", "send the message"),
    ("ctrl+j", None, "", "new line in the message (also Shift+Enter where the terminal has it)"),
    ("escape", "stop", "stop", "stop the reply, or the reading of a long prompt"),
    ("ctrl+r", "regenerate", "regenerate", "regenerate the last reply"),
    ("ctrl+l", "edit_last", "edit last", "edit the last message and send it again"),
    ("ctrl+n", "new_chat", "new", "start a new chat (default system prompt and settings)"),
    ("ctrl+o", "models", "models", "choose another model from those on this machine"),
    ("f2", "system_prompt", "system", "set this chat's system prompt"),
    ("f3", "settings", "settings", "temperature, top-p, top-k, min-p, max tokens, penalty, seed"),
    ("f4", "toggle_experts", "experts", "show / hide the experts panel (Mixtral)"),
    ("f5", "export", "export", "export this chat to Markdown and JSON (current folder)"),
    ("f8", "copy_reply", "copy", "copy the last reply (OSC 52)"),
    ("f9", "copy_code", "copy code", "copy the last code block of the last reply (OSC 52)"),
    ("f12", "delete_chat", "delete", "delete this chat (asks first)"),
    ("ctrl+t", "rename_chat", "rename", "rename this chat"),
    ("ctrl+b", "toggle_sidebar", "chats", "show / hide the list of chats"),
    ("pageup", None, "", "scroll the conversation up (PageDown: down), also from the message "
     "box"),
    ("tab", None, "", "move between the message box and the list of chats; in the list, "
     "Up/Down and Enter open a chat"),
    ("ctrl+p", None, "", "command palette: every action, and search your chats by their words"),
    ("f1", "help", "help", "this help"),
    ("ctrl+q", "quit", "quit", "quit"),
]
FOOTER_KEYS = ("f1", "escape", "ctrl+n", "ctrl+o", "f2", "f3")
PAGE_KEYS = {"pageup": -1, "pagedown": 1}  # in the message box: scroll the conversation


def key_label(key: str) -> str:
    """ctrl+r -> Ctrl+R, escape -> Esc, f1 -> F1."""
    names = {"escape": "Esc", "enter": "Enter", "tab": "Tab", "pageup": "PageUp",
             "pagedown": "PageDown"}
    if key in names:
        return names[key]
    return "+".join(part.capitalize() if len(part) > 1 and not part.startswith("f")
                    else part.upper() for part in key.split("+"))


def actions() -> list[tuple[str, str, str]]:
    """(action, description, key) for every key that has an action."""
    return [(action, text[0].upper() + text[1:], key_label(key))
            for key, action, _, text in KEYS if action]
