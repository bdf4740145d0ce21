"""Modal screens: settings, system prompt, help."""

from __future__ import annotations

from dataclasses import replace

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, Static, TextArea
from textual.widgets.option_list import Option

from ..catalog.local import LocalModel
from ..errors import MlxMixtralError
from ..generation.sampling import SETTINGS, SamplingParams
from ..units import size
from .engine import ModelList

# The settings the screen shows: those `SETTINGS` gives a label.
FIELDS = [s for s in SETTINGS if s.label is not None]

MODAL_CSS = """
SettingsScreen, SystemPromptScreen, HelpScreen, ModelPickerScreen, ConfirmScreen {
    align: center middle;
}
#dialog { width: 70; max-width: 100%; height: auto; max-height: 100%; border: thick $primary;
          background: $surface; padding: 1 2; }
#fields { grid-size: 2; grid-columns: 30 1fr; grid-rows: 1; height: auto; }
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
                for field in FIELDS:
                    value = getattr(self.settings, field.name)
                    yield Label(field.label)
                    yield Input("" if value is None else str(value), id=f"set-{field.name}",
                                compact=True)
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
            for field in FIELDS:
                raw = self.query_one(f"#set-{field.name}", Input).value.strip()
                if field.default is None and not raw:  # (the seed) empty means none
                    values[field.name] = None
                    continue
                try:
                    values[field.name] = field.kind(raw)
                except ValueError:
                    raise MlxMixtralError(f"{field.label}: {raw!r} is not a number") from None
            self.dismiss(replace(self.settings, **values))  # the settings not shown stay
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
    CSS = MODAL_CSS + """
    HelpScreen #dialog { width: 100%; max-width: 90; height: 90%; padding: 0 1; }
    #keys { height: 1fr; }
    #keys Horizontal { height: auto; }
    #keys .key { width: 9; text-style: bold; }
    #keys .what { width: 1fr; }
    """
    BINDINGS = [Binding("escape,f1,q", "close", "Close")]

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = keys

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static("[b]Keys[/b] (Esc closes; the list scrolls)")
            with VerticalScroll(id="keys"):
                for key, what in self.keys:
                    with Horizontal():
                        yield Static(key, classes="key")
                        yield Static(what, classes="what")

    def action_close(self) -> None:
        self.dismiss(None)


class ModelPickerScreen(ModalScreen[str | None]):
    """The models the engine offers (this machine's, or a server's); Enter loads the
    highlighted one."""

    CSS = MODAL_CSS + """
    ModelPickerScreen #dialog { width: 100%; max-width: 100; }
    #models { height: auto; max-height: 16; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, offer: ModelList, current: str) -> None:
        super().__init__()
        self.models, self.current, self.available = offer.models, current, offer.available
        self.server = offer.server

    def _row(self, m: LocalModel) -> str:
        mark = "●" if m.name == self.current else " "
        if self.server:  # its size and fit are the server's business
            return f"{mark} {m.name}"
        label = m.label if len(m.label) <= 34 else m.label[:33] + "…"
        fits = m.fit(self.available)
        return f"{mark} {label:<34} {m.origin:<12} {size(m.memory_bytes):>9}  {fits}"

    def compose(self) -> ComposeResult:
        where = f"at {self.server}" if self.server else "on this machine"
        note = (f"Served by {self.server} (GET /v1/models)." if self.server else
                f"In memory once loaded; {size(self.available)} is available. "
                "`mlx-mixtral list` prints this list.")
        with Vertical(id="dialog"):
            yield Static(f"[b]Models {where}[/b] (Enter loads, Esc closes)")
            yield OptionList(*[Option(self._row(m), id=str(i)) for i, m in
                               enumerate(self.models)], id="models")
            yield Static(f"[dim]{note}[/dim]", id="note")

    def on_mount(self) -> None:
        names = [m.name for m in self.models]
        options = self.query_one("#models", OptionList)
        options.highlighted = names.index(self.current) if self.current in names else 0
        options.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.models[int(event.option.id)].name)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; Enter or y confirms, Esc or n declines; Left/Right (or Tab) move
    between the buttons."""

    CSS = MODAL_CSS + "ConfirmScreen #dialog { width: 60; }"
    BINDINGS = [Binding("escape,n", "answer(False)", "No"), Binding("y", "answer(True)", "Yes"),
                Binding("left", "app.focus_previous", show=False),
                Binding("right", "app.focus_next", show=False)]

    def __init__(self, question: str, yes: str = "Yes") -> None:
        super().__init__()
        self.question, self.yes = question, yes

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(self.question)
            with Horizontal(id="buttons"):
                yield Button(self.yes, variant="error", id="yes")
                yield Button("Cancel", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()  # the safe answer is the default

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class TextPromptScreen(ModalScreen[str | None]):
    """One line of text (a chat's title); Enter saves, Esc cancels."""

    CSS = MODAL_CSS + "TextPromptScreen { align: center middle; }"
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, value: str) -> None:
        super().__init__()
        self.title_text, self.value = title, value

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(f"[b]{self.title_text}[/b] (Enter saves, Esc cancels)")
            yield Input(self.value, id="text")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)
