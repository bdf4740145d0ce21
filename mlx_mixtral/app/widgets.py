"""The chat app's widgets: the loading panel, the list of chats, the messages, the prompt box,
the status bar, the experts heatmap."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.message import Message as TextualMessage
from textual.widgets import ListItem, ListView, Markdown, ProgressBar, Static, TextArea

from ..generation.sampling import SETTINGS, ModelDefaults, SamplingParams
from .engine import EngineInfo
from .keys import PAGE_KEYS
from .store import Message, SavedChat

FENCE = re.compile(r"^ {0,3}(```|~~~)", re.M)  # a line that opens or closes a code block
_FENCE_LINE = re.compile(r" {0,3}(`{3,}|~{3,})")
_BLOCK_START = re.compile(r"([-*+]|\d{1,9}[.)])(\s|$)|[>#|]")  # a list item, quote, heading, table
# An indenting space: Textual's Markdown collapses every run of whitespace (a no-break space
# too) into one space, so each is kept apart from the next by a zero-width space.
INDENT = "\u00a0\u200b"


def hard_breaks(text: str) -> str:
    """`text` as Markdown that keeps its line breaks: a model writes a poem or unfenced code
    line by line, and Markdown would join single lines into one paragraph and drop the
    indentation of continued lines. Outside code blocks every line break becomes a hard break
    (two trailing spaces) and a continued line's indentation kept spaces (but for a
    nested list item or quote); fenced and indented code is left as it is."""
    out: list[str] = []
    fence = ""  # the open fence's marker
    code = False  # inside an indented code block
    previous = ""  # the line before ("": none or blank)
    lines = text.split("\n")
    for i, line in enumerate(lines):
        marker = _FENCE_LINE.match(line)
        stripped = line.strip()
        if fence:
            if marker and marker.group(1)[0] == fence[0] and len(marker.group(1)) >= len(fence) \
                    and not line[marker.end():].strip():
                fence = ""
        elif marker:
            fence = marker.group(1)
        elif stripped:
            indent = len(line) - len(line.lstrip(" \t"))
            width = len(line[:indent].expandtabs(4))
            code = width >= 4 and (code or not previous)  # begins after a blank line
            if not code:
                if indent and previous and not _BLOCK_START.match(stripped):
                    line = INDENT * width + line[indent:]
                if i < len(lines) - 1:
                    line += "  "
        out.append(line)
        previous = "" if marker or fence or not stripped else line
    return "\n".join(out)


class UserMessage(Static):
    DEFAULT_CSS = """
    UserMessage {
        background: $boost;
        border-left: thick $accent;
        padding: 0 1;
        margin: 1 0 0 8;
    }
    """

    def __init__(self, text: str, message_id: int | None = None) -> None:
        super().__init__(Text(text), markup=False)
        self.text, self.message_id = text, message_id


class AssistantMessage(Markdown):
    """A reply, rendered as Markdown (code blocks included) while it streams."""

    DEFAULT_CSS = """
    AssistantMessage {
        border-left: thick $success;
        padding: 0 1;
        margin: 1 8 0 0;
    }
    AssistantMessage.stopped { border-left: thick $warning; }
    AssistantMessage.interrupted { border-left: thick $error; }
    /* no blank line under the last paragraph; a scrollbar under code wider than the box */
    AssistantMessage > MarkdownBlock:last-child { margin-bottom: 0; }
    AssistantMessage MarkdownFence { scrollbar-size-horizontal: 1; }
    """

    def __init__(self, text: str = "", message_id: int | None = None,
                 status: str = "complete") -> None:
        self.shown = hard_breaks(text)  # the Markdown shown (but the marker)
        super().__init__(self.shown + self._marker(status, text))
        self.text, self.message_id = text, message_id
        self.set_status(status)

    @staticmethod
    def _marker(status: str, text: str = "") -> str:
        marker = {"stopped": "\n\n*[stopped]*", "streaming": "\n\n*[interrupted]*"}.get(status,
                                                                                         "")
        if marker and len(FENCE.findall(text)) % 2:  # cut inside a code block: close it first
            marker = "\n```" + marker
        return marker

    def set_status(self, status: str) -> None:
        self.set_class(status == "stopped", "stopped")
        self.set_class(status == "streaming", "interrupted")

    async def add(self, fragment: str) -> None:
        self.text += fragment
        shown, self.shown = self.shown, hard_breaks(self.text)
        if self.shown.startswith(shown):
            await self.append(self.shown[len(shown):])
        else:  # (rare: a line's start turned out a list item after all)
            await self.update(self.shown)

    async def finish(self, status: str) -> None:
        self.set_status(status)
        if status == "stopped":
            await self.append(self._marker(status, self.text))


class Notice(Static):
    DEFAULT_CSS = """
    Notice { color: $text-muted; border-left: thick $primary; padding: 0 1; margin: 1 8 0 0; }
    """

    def __init__(self, text: str) -> None:
        super().__init__(Text(text), markup=False)


class MessageList(VerticalScroll):
    """The open chat's messages, kept in step with the conversation's list."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shown: list[Message] = []  # the messages the widgets show, in order

    async def show(self, messages: list[Message], writing: Message | None = None) -> None:
        """Keep the widgets of the messages still there, drop the rest, add the new ones.
        (`writing`: the reply being streamed, shown as it comes.)"""
        kept = 0
        for shown, message in zip(self.shown, messages, strict=False):
            if shown is not message:  # (the store reuses a deleted message's id)
                break
            kept += 1
        if messages:  # the conversation begins: the note at the start has been read
            await self.query(Notice).remove()
        widgets = [w for w in self.children if isinstance(w, (UserMessage, AssistantMessage))]
        if widgets[kept:]:
            await self.remove_children(widgets[kept:])
        new = [UserMessage(m.content, m.id) if m.role == "user" else
               AssistantMessage(m.content, m.id, "complete" if m is writing else m.status)
               for m in messages[kept:]]
        if new:
            await self.mount_all(new)
        self.shown = list(messages)

    def note(self, text: str) -> None:
        """A note in the empty chat (the first run's hint), until the first message."""
        self.mount(Notice(text))

    def last_reply(self) -> AssistantMessage:
        return self.query(AssistantMessage).last()


class ChatList(ListView):
    """The stored chats, newest first, the open one marked. A narrow terminal hides it, to
    give the conversation the room; Ctrl+B shows it (or, when wide, hides it)."""

    toggled = False

    def on_focus(self) -> None:
        """Tabbing in highlights a row (the open chat's, else the first), so Enter opens it."""
        if self.index is None and self.children:
            self.index = 0

    def fit(self, width: int) -> None:
        self.set_class((width < 100) != self.toggled, "hidden")

    def toggle(self) -> None:
        self.toggled = not self.toggled
        self.toggle_class("hidden")

    def show(self, chats: list[SavedChat], current: int | None) -> None:
        self.clear()
        for i, c in enumerate(chats):
            # One line each for the title and the model, cut with an ellipsis, never wrapped.
            label = Text(c.title + "\n")
            label.append(Path(c.model).name or c.model, style="dim")
            item = ListItem(Static(label), classes="current" if c.id == current else "")
            item.conversation_id = c.id
            self.append(item)
            if c.id == current:
                self.index = i


class LoadingPanel(Vertical):
    """The model's name and a progress bar while it loads; why, when it could not."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_name = name

    def compose(self) -> ComposeResult:
        yield Static(f"Loading {self.model_name} ...", id="loading-text")
        yield ProgressBar(total=1.0, show_eta=False, id="progress")

    def start(self, name: str) -> None:
        self.query_one("#loading-text", Static).update(f"Loading {name} ...")
        self.query_one("#progress", ProgressBar).update(progress=0)
        self.query_one("#progress").remove_class("hidden")
        self.remove_class("hidden")

    def progress(self, fraction: float) -> None:
        self.query_one("#progress", ProgressBar).update(progress=fraction)

    def failed(self, name: str, message: str, hint: str) -> None:
        self.query_one("#loading-text", Static).update(
            f"[b red]Could not load {name}[/]\n{message}\n{hint}")
        self.query_one("#progress").add_class("hidden")


class PromptInput(TextArea):
    """Multi-line prompt: Enter sends; Ctrl+J (or Shift+Enter) inserts a newline."""

    class Submitted(TextualMessage):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    class Page(TextualMessage):
        """PageUp (-1) or PageDown (+1): the conversation scrolls, not this small box."""

        def __init__(self, pages: int) -> None:
            super().__init__()
            self.pages = pages

    def edit_text(self, text: str) -> None:
        """`text` to edit, typing at its end."""
        self.text = text
        self.move_cursor(self.document.end)
        self.focus()

    async def _on_key(self, event) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self.text))
            return
        if event.key in PAGE_KEYS:
            event.stop()
            event.prevent_default()
            self.post_message(self.Page(PAGE_KEYS[event.key]))
            return
        if event.key in ("ctrl+j", "shift+enter"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)


def changed_settings(settings: SamplingParams, base: SamplingParams | None = None) -> str:
    """The settings that differ from `base` (the defaults), shortly: "temp 0.2, max 256"."""
    base = base or SamplingParams()
    return ", ".join(f"{s.short or s.name} {getattr(settings, s.name)}" for s in SETTINGS
                     if getattr(settings, s.name) != getattr(base, s.name))


def chat_flags(system: str | None, settings: SamplingParams,
               defaults: ModelDefaults | None = None) -> str:
    """What this chat has set: "system prompt, demo defaults: temp 0.2, penalty 1.1, max 256"
    (the model's own defaults it keeps, then what else differs from the defaults)."""
    defaults = defaults or ModelDefaults()
    kept = ModelDefaults(defaults.name, {k: v for k, v in defaults.values.items()
                                         if getattr(settings, k) == v})
    return ", ".join(x for x in ("system prompt" if system else "", kept.describe(),
                                 changed_settings(settings, defaults.apply(SamplingParams())))
                     if x)


def context_text(info: EngineInfo, numbers: dict[str, Any]) -> str:
    """"context 569/32768"; "context 569" when the limit is not known (a server's model); ""
    when neither is."""
    used, limit = numbers.get("context_used") or 0, info.window or info.context
    kind = "window" if info.window else "context"
    if limit:
        return f"{kind} {min(used, limit)}/{limit}"
    return f"{kind} {used}" if used else ""


def reply_parts(numbers: dict[str, Any]) -> list[tuple[int, str]]:
    """The last reply's speed, first token and peak memory, as far as they are known: a reply
    stopped before its first token has no speed nor TTFT, a server tells no peak memory."""
    tps, ttft, peak = (numbers.get(k) for k in ("generation_tps", "ttft", "peak_memory"))
    if not numbers.get("generation_tokens"):
        tps = ttft = None
    return [(3, f"{tps:.1f} tok/s" if tps is not None else ""),
            (5, f"TTFT {ttft:.2f} s" if ttft is not None else ""),
            (6, f"peak {peak / 1e9:.2f} GB" if peak else "")]


class StatusBar(Static):
    DEFAULT_CSS = """
    StatusBar { height: 1; background: $panel; color: $text-muted; padding: 0 1; }
    """

    def show(self, info: EngineInfo | None, numbers: dict[str, Any] | None = None,
             note: str = "", flags: str = "") -> None:
        """One line: the model, the last reply's `numbers` (as stored), a note and the chat's
        flags; when it is too wide, the least useful parts go first, the note last."""
        if info is None:
            self.update(note)
            return
        parts = [(0, note), (1, context_text(info, numbers or {})), (2, flags),
                 (4, info.name)] + reply_parts(numbers or {})  # (priority: lower stays longer)
        order = [4, 3, 5, 1, 6, 2, 0]  # how they read, left to right
        shown = [p for p in parts if p[1]]
        width = (self.size.width or 200) - 2
        while len(shown) > 1 and len(" │ ".join(t for _, t in shown)) > width:
            shown.remove(max(shown))
        shown.sort(key=lambda p: order.index(p[0]))
        self.update(" │ ".join(t for _, t in shown))


SHADES = " ░▒▓█"


class ExpertsPanel(Static):
    """Layers x experts heatmap of the last reply's routing, and its load balance."""

    DEFAULT_CSS = """
    ExpertsPanel { width: 36; border-left: solid $primary; padding: 0 1;
                   overflow-y: auto; }
    """

    def show(self, share: list[list[float]] | None, balance: float | None,
             top_k: int = 2) -> None:
        if not share:
            self.update("Experts\n\n(no reply yet)")
            return
        experts = len(share[0])
        text = Text("Experts (share of reply tokens)\n\n", style="bold")
        text.append("layer " + "".join(f"{e:>2}" for e in range(experts)) + "\n")
        fair = top_k / experts
        for layer, row in enumerate(share):
            text.append(f"{layer:>5} ")
            for value in row:
                level = min(len(SHADES) - 1, int(value / (2 * fair) * (len(SHADES) - 1) + 0.5))
                style = "bold red" if value >= 2 * fair else "cyan"
                text.append(" " + SHADES[level], style=style if level else "dim")
            text.append("\n")
        if balance is not None:
            text.append(f"\nload balance {balance:.2f} ({top_k:.2f} = even)")
        self.update(text)
