"""`mlx-mixtral chat`: the terminal chat app.

The app lays out the widgets and routes events to plain objects: the open chat and what send,
regenerate and edit do to it live in `Conversation` (which keeps the store in step); every
engine call runs on the `EngineWorker`'s one thread, whose events a 20 Hz timer drains into
the widgets. All database writes happen on the UI thread.
"""

from __future__ import annotations

import re
import time
from collections import deque
from pathlib import Path

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Header, ListView

from ..errors import MlxMixtralError
from ..generation.sampling import SamplingParams
from ..generation.stats import Chunk, Stats
from .commands import ChatCommands
from .conversation import Conversation, Turn
from .engine import Engine, EngineInfo, ModelList, Prefill, Ready
from .export import export
from .keys import FOOTER_KEYS, KEYS, key_label
from .screens import (
    ConfirmScreen,
    HelpScreen,
    ModelPickerScreen,
    SettingsScreen,
    SystemPromptScreen,
    TextPromptScreen,
)
from .store import Store
from .widgets import (
    ChatList,
    ExpertsPanel,
    LoadingPanel,
    MessageList,
    PromptInput,
    StatusBar,
    chat_flags,
)
from .worker import EngineWorker

UI_INTERVAL = 0.05  # seconds between UI updates while streaming (about 20 a second)
CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.S)
ACTIONS = {action for _, action, _, _ in KEYS if action}


def prefill_note(progress: Prefill, seconds: float, replying: bool) -> str:
    """The status line while a prompt is read, `seconds` after it started."""
    if progress.done >= progress.total:
        return "generating ... (Esc stops)" if replying else "chat ready"
    left = seconds / max(progress.done, 1) * (progress.total - progress.done)
    what = "reading the prompt" if replying else "reading this chat"
    return (f"{what}: {progress.done}/{progress.total} tokens, about {left:.0f} s left"
            + (" (Esc stops)" if replying else ""))


class ChatApp(App):
    TITLE = "mlx-mixtral"
    CSS = """
    #main { height: 1fr; }
    #sidebar { width: 28; border-right: solid $primary; }
    #sidebar.hidden, ExpertsPanel.hidden { display: none; }
    #messages { height: 1fr; padding: 0 1; }
    PromptInput { height: 5; border: round $accent; }
    #loading { height: auto; padding: 1 2; }
    #loading.hidden, #progress.hidden { display: none; }
    #sidebar ListItem.current { background: $boost; text-style: bold; }
    #sidebar Static { text-wrap: nowrap; text-overflow: ellipsis; }
    """
    # Not priority bindings: the message box keeps its own editing keys, and a dialog its Esc.
    BINDINGS = [Binding(key, action, label, show=key in FOOTER_KEYS)
                for key, action, label, _ in KEYS if action]
    COMMANDS = App.COMMANDS | {ChatCommands}

    def __init__(self, engine: Engine, model_name: str, store: Store, system: str | None = None,
                 settings: SamplingParams | None = None, export_dir: Path | None = None) -> None:
        super().__init__()
        self.engine, self.model_name, self.store = engine, model_name, store
        self.conversation = Conversation(store, model_name, system, settings)
        self.worker = EngineWorker(engine)
        self.export_dir = export_dir or Path.cwd()
        self.info: EngineInfo | None = None  # the loaded model (None: loading)
        self.editing = False  # Ctrl+L: the next message replaces the last one
        self.replies_done = 0  # finished replies, for whoever waits on the app (tests)
        # (done, total) as heard, the latest few, for tests and whoever watches the app
        self.prefill_seen: deque[tuple[int, int]] = deque(maxlen=10_000)
        self._prefill_t0 = time.monotonic()
        self._sidebar_toggled = False

    @property
    def generating(self) -> bool:
        return self.conversation.reply is not None

    # ---- layout ---------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            yield ChatList(id="sidebar")
            with Vertical():
                yield LoadingPanel(self.model_name, id="loading")
                yield MessageList(id="messages")
                yield PromptInput(id="prompt")
            yield ExpertsPanel(classes="hidden", id="experts")
        yield StatusBar(id="status")
        yield Footer()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """While a dialog is open, its keys are its own (quitting still works)."""
        return not (isinstance(self.screen, ModalScreen) and action in ACTIONS
                    and action != "quit")

    def on_resize(self, event) -> None:
        # A narrow terminal gives the conversation the room; Ctrl+B still shows the chats.
        narrow = event.size.width < 100
        self.query_one(ChatList).set_class(narrow != self._sidebar_toggled, "hidden")

    def on_mount(self) -> None:
        self.query_one(MessageList).anchor()
        self.query_one(StatusBar).show(None, note=f"loading {self.model_name} ...")
        self.set_interval(UI_INTERVAL, self._drain)
        self.refresh_sidebar()
        self.worker.submit(self._load)

    def _focus_prompt(self) -> None:
        self.query_one(PromptInput).focus()

    def _status(self, note: str = "") -> None:
        if not self.query(StatusBar):  # the app is closing: a late timer tick has no bar
            return
        c = self.conversation
        self.query_one(StatusBar).show(self.info, c.numbers, note, chat_flags(c.system,
                                                                             c.settings))

    # ---- the model ------------------------------------------------------------------------

    def _load(self) -> None:  # on the worker
        panel = self.query_one(LoadingPanel)
        try:
            info = self.engine.load(lambda f: self.call_from_thread(panel.progress, f))
        except Exception as e:  # noqa: BLE001 - shown in the app, never a traceback
            message = str(e) if isinstance(e, MlxMixtralError) else f"{type(e).__name__}: {e}"
            self.call_from_thread(self._load_failed, message)
            return
        self.call_from_thread(self._loaded, info)

    def _loaded(self, info: EngineInfo) -> None:
        self.info = info
        self.sub_title = info.describe()  # in the header: no toast over the message box
        self.query_one(LoadingPanel).add_class("hidden")
        experts = self.query_one(ExpertsPanel)
        experts.set_class(not info.is_moe, "hidden")
        if info.is_moe:
            experts.show(None, None, info.top_k)
        self._status(note="model loaded")
        self._focus_prompt()
        self.conversation.set_model(self.model_name)  # a switched model continues the chat
        self._prefill()

    def _load_failed(self, message: str) -> None:
        self.query_one(LoadingPanel).failed(self.model_name, message, f"Press "
                                            f"{key_label('ctrl+o')} to choose another model.")
        self.query_one(StatusBar).show(None, note="load failed")

    def action_models(self) -> None:
        if self.generating:
            self.notify("Stop the reply first (Esc)", severity="warning")
            return
        # In a thread of its own: a server may take its time, and a prefill may hold the worker.
        self.run_worker(self._list_models, thread=True, exclusive=True, group="models")

    def _list_models(self) -> None:
        try:
            offer = self.engine.models()
        except MlxMixtralError as e:
            self.call_from_thread(self.notify, str(e), severity="error")
            return
        self.call_from_thread(self._offer_models, offer)

    def _offer_models(self, offer: ModelList) -> None:
        self.push_screen(ModelPickerScreen(offer, self.model_name), self._switch_model)

    def _switch_model(self, name: str | None) -> None:
        self._focus_prompt()
        if not name or (name == self.model_name and self.info is not None):
            return
        self.model_name, self.info = name, None
        self.worker.cancel_prefill()
        self.query_one(LoadingPanel).start(name)
        self.query_one(StatusBar).show(None, note=f"loading {name} ...")
        self.worker.submit(self.engine.select, name)
        self.worker.submit(self._load)

    # ---- chats ----------------------------------------------------------------------------

    def refresh_sidebar(self) -> None:
        self.query_one(ChatList).show(self.store.list(), self.conversation.id)

    async def on_list_view_selected(self, event: ListView.Selected) -> None:
        conversation_id = getattr(event.item, "conversation_id", None)
        if conversation_id is not None:
            await self.choose_chat(conversation_id)

    async def choose_chat(self, conversation_id: int) -> None:
        """From the list of chats or the command palette."""
        if not self.generating:
            await self.open_conversation(conversation_id)
            self._focus_prompt()

    async def open_conversation(self, conversation_id: int) -> None:
        saved = self.conversation.open(conversation_id)
        if saved is None:
            return
        self.editing = False
        await self.query_one(MessageList).show(self.conversation.messages)
        self._prefill()
        if Path(saved.model).name != Path(self.model_name).name:
            self.notify(f"This chat was held with {saved.model}; continuing with "
                        f"{self.model_name}.", severity="warning")
        self.refresh_sidebar()
        self._status(note=f"opened “{saved.title}”")

    def _prefill(self) -> None:
        """Have the engine read the open chat now (a new one has nothing to read; a model still
        loading reads it once loaded)."""
        self.worker.cancel_prefill()
        if self.info is not None and self.conversation.messages:
            self._prefill_t0 = time.monotonic()
            self.worker.prefill(self.conversation.prompt())

    async def action_new_chat(self) -> None:
        if self.generating:
            return
        self.conversation.new()
        self.editing = False
        await self.query_one(MessageList).show([])
        self._prefill()
        self.refresh_sidebar()
        self._focus_prompt()
        self._status(note="new chat")

    # ---- replies --------------------------------------------------------------------------

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text.strip()
        if not text or self.generating or self.info is None:
            return
        self.query_one(PromptInput).clear()
        new = self.conversation.id is None
        turn = self.conversation.edit(text) if self.editing else self.conversation.send(text)
        self.editing = False
        if new:
            self.refresh_sidebar()
        await self._start(turn)

    async def action_regenerate(self) -> None:
        turn = None if self.generating else self.conversation.regenerate()
        if turn is not None:
            await self._start(turn)

    async def _start(self, turn: Turn) -> None:
        messages = self.query_one(MessageList)
        await messages.show(self.conversation.messages, self.conversation.reply)
        messages.anchor()
        self._prefill_t0 = time.monotonic()
        self.worker.reply(turn)
        self._status(note="generating ... (Esc stops)")

    async def _drain(self) -> None:
        events = self.worker.take()
        progress = [e for e in events if isinstance(e, Prefill)]
        self.prefill_seen += [(p.done, p.total) for p in progress]
        ready = [e for e in events if isinstance(e, Ready)]
        if ready:
            if ready[-1].context:
                self.conversation.numbers["context_used"] = ready[-1].context
            self._status(note="chat ready")
        elif progress:
            self._status(note=prefill_note(progress[-1], time.monotonic() - self._prefill_t0,
                                           self.generating))
        if not self.generating:
            return
        text = "".join(e.text for e in events if isinstance(e, Chunk))
        if text:
            self.conversation.extend(text)
            await self.query_one(MessageList).last_reply().add(text)
        end = next((e for e in events if isinstance(e, Stats)), None)
        if end is not None:
            await self._finish(end)

    async def _finish(self, end: Stats) -> None:
        reply = self.conversation.finish(end)
        await self.query_one(MessageList).last_reply().finish(reply.status)
        self.replies_done += 1
        if end.error:
            self.notify(end.error, title="Generation failed", severity="error")
        if end.expert_share is not None and self.info is not None:
            self.query_one(ExpertsPanel).show(end.expert_share, end.balance, self.info.top_k)
        self._status(note="stopped" if reply.status == "stopped" else "")
        self.refresh_sidebar()

    def action_stop(self) -> None:
        if self.generating:
            self.worker.stopping.set()

    def action_edit_last(self) -> None:
        last = self.conversation.last("user")
        if self.generating or last is None:
            return
        prompt = self.query_one(PromptInput)
        prompt.text = last.content
        prompt.move_cursor(prompt.document.end)
        prompt.focus()
        self.editing = True
        self._status(note="editing the last message: Enter resends it")

    # ---- dialogs and the rest -------------------------------------------------------------

    def action_system_prompt(self) -> None:
        def apply(text: str | None) -> None:
            self._focus_prompt()
            if text is not None and self.conversation.set_system(text):
                self._prefill()
                self._status(note="system prompt set" if self.conversation.system
                             else "no system prompt")

        self.push_screen(SystemPromptScreen(self.conversation.system), apply)

    def action_settings(self) -> None:
        def apply(settings: SamplingParams | None) -> None:
            self._focus_prompt()
            if settings is not None:
                self.conversation.set_settings(settings)
                self._status(note="settings saved")

        self.push_screen(SettingsScreen(self.conversation.settings), apply)

    def _copy(self, text: str | None, done: str, nothing: str | None = None) -> None:
        if text:
            self.copy_to_clipboard(text)
            self.notify(done)
        elif nothing:
            self.notify(nothing, severity="warning")

    def action_copy_reply(self) -> None:
        last = self.conversation.last("assistant")
        self._copy(last and last.content, "Copied the last reply")

    def action_copy_code(self) -> None:
        last = self.conversation.last("assistant")
        blocks = CODE_BLOCK.findall(last.content if last else "")
        self._copy(blocks[-1] if blocks else None, "Copied the last code block",
                   "The last reply has no code block")

    def action_export(self) -> None:
        if self.conversation.id is None:
            self.notify("Nothing to export yet", severity="warning")
            return
        md, js = export(self.store.load(self.conversation.id), self.export_dir)
        self.notify(f"Exported to {md} and {js}")

    def action_delete_chat(self) -> None:
        cid, title = self.conversation.id, self.conversation.title()
        if self.generating or cid is None:
            return

        async def answer(yes: bool | None) -> None:
            self._focus_prompt()
            if yes and self.conversation.id == cid:
                self.conversation.delete()
                await self.action_new_chat()
                self.notify(f"Deleted “{title}”")

        self.push_screen(ConfirmScreen(f"Delete the chat “{title}”?\nThis cannot be undone.",
                                       "Delete"), answer)

    def action_rename_chat(self) -> None:
        if self.conversation.id is None:
            self.notify("Nothing to rename yet: send a message first", severity="warning")
            return

        def apply(title: str | None) -> None:
            self._focus_prompt()
            if title:
                self.conversation.rename(title)
                self.refresh_sidebar()

        self.push_screen(TextPromptScreen("Rename this chat", self.conversation.title()), apply)

    def action_toggle_sidebar(self) -> None:
        self._sidebar_toggled = not self._sidebar_toggled
        self.query_one(ChatList).toggle_class("hidden")

    def action_toggle_experts(self) -> None:
        if self.info is not None and self.info.is_moe:
            self.query_one(ExpertsPanel).toggle_class("hidden")

    def action_help(self) -> None:
        self.push_screen(HelpScreen([(key_label(key), text) for key, _, _, text in KEYS]),
                         lambda _: self._focus_prompt())

    async def action_quit(self) -> None:
        self.worker.close()
        await self._drain()
        self.exit()

    def on_unmount(self) -> None:
        # However the app ends: stop the generation thread before the interpreter exits, or
        # MLX aborts the process on its way out ("terminate called ...").
        self.worker.close()
