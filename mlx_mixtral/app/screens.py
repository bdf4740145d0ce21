"""Modal screens: settings, system prompt, help."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static, TextArea

from ..errors import MlxMixtralError
from ..generation.sampling import SamplingParams

FIELDS = [  # (SamplingParams field, label, type)
    ("temperature", "Temperature (0 = greedy)", float),
    ("top_p", "Top-p (1 = off)", float),
    ("top_k", "Top-k (0 = off)", int),
    ("min_p", "Min-p (0 = off)", float),
    ("max_tokens", "Max tokens", int),
    ("repetition_penalty", "Repetition penalty (1 = off)", float),
    ("seed", "Seed (empty = random)", int),
]

MODAL_CSS = """
SettingsScreen, SystemPromptScreen, HelpScreen { align: center middle; }
#dialog { width: 70; height: auto; max-height: 90%; border: thick $primary; background: $surface;
          padding: 1 2; }
#fields { grid-size: 2; grid-columns: 32 1fr; grid-rows: 3; height: auto; }
#fields Label { padding: 1 0; }
#buttons { height: 3; margin-top: 1; }
#buttons Button { margin-right: 2; }
#error { color: $error; height: auto; }
"""


class SettingsScreen(ModalScreen[SamplingParams | None]):
    """Sampling settings for the next reply; saved with the chat."""

    CSS = MODAL_CSS
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, settings: SamplingParams) -> None:
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static("[b]Settings[/b] (apply to the next reply)")
            with Grid(id="fields"):
                for name, label, _ in FIELDS:
                    value = getattr(self.settings, name)
                    yield Label(label)
                    yield Input("" if value is None else str(value), id=f"set-{name}")
            yield Static("", id="error")
            with Horizontal(id="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
            return
        self.action_save()

    def on_input_submitted(self, _: Input.Submitted) -> None:
        self.action_save()

    def action_save(self) -> None:
        values = {}
        try:
            for name, label, kind in FIELDS:
                raw = self.query_one(f"#set-{name}", Input).value.strip()
                if name == "seed" and not raw:
                    values[name] = None
                    continue
                try:
                    values[name] = kind(raw)
                except ValueError:
                    raise MlxMixtralError(f"{label}: {raw!r} is not a number") from None
            self.dismiss(SamplingParams(**values))
        except MlxMixtralError as e:
            self.query_one("#error", Static).update(str(e))

    def action_cancel(self) -> None:
        self.dismiss(None)


class SystemPromptScreen(ModalScreen[str | None]):
    CSS = MODAL_CSS + "#system { height: 10; }"
    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(self, system: str | None) -> None:
        super().__init__()
        self.system = system or ""

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static("[b]System prompt[/b] (Ctrl+S saves, Esc cancels; empty = none)")
            yield TextArea(self.system, id="system")
            with Horizontal(id="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_save() if event.button.id == "save" else self.action_cancel()

    def action_save(self) -> None:
        self.dismiss(self.query_one("#system", TextArea).text)

    def action_cancel(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    CSS = MODAL_CSS + "HelpScreen #dialog { width: 96; }"
    BINDINGS = [Binding("escape,f1,q", "close", "Close")]

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = keys

    def compose(self) -> ComposeResult:
        lines = "\n".join(f"  [b]{key:<14}[/b] {what}" for key, what in self.keys)
        with Vertical(id="dialog"):
            yield Static(f"[b]Keys[/b]\n\n{lines}\n\n(Esc closes)")

    def action_close(self) -> None:
        self.dismiss(None)
