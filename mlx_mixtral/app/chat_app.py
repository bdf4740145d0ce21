"""`mlx-mixtral chat`: the terminal chat app.

Threads: the UI runs on Textual's event loop; every MLX call (loading, generation) runs on one
dedicated worker thread, so MLX always sees the same thread. The worker hands text to the UI
through a locked buffer that a 20 Hz timer drains, so a fast model cannot flood the UI.
All database writes happen on the UI thread.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Header, ListItem, ListView, ProgressBar, Static

from ..errors import MlxMixtralError
from ..generation.sampling import SETTINGS, SamplingParams
from ..loading.catalog import LocalModel, local_models
from .commands import ChatCommands
from .engine import Engine, EngineInfo, ReplyEvent
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
from .widgets import AssistantMessage, ExpertsPanel, PromptInput, StatusBar, UserMessage

UI_INTERVAL = 0.05  # seconds between UI updates while streaming (about 20 a second)
SAVE_INTERVAL = 1.0  # seconds between saves of the reply being streamed
CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.S)
ACTIONS = {action for _, action, _, _ in KEYS if action}


def changed_settings(settings: SamplingParams) -> str:
    """The settings that differ from the defaults, shortly: "temp 0.2, max 256"."""
    return ", ".join(f"{s.short or s.name} {getattr(settings, s.name)}" for s in SETTINGS
                     if getattr(settings, s.name) != s.default)


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
                 settings: SamplingParams | None = None, export_dir: Path | None = None,
                 catalog: Callable[[], list[LocalModel]] = local_models) -> None:
        super().__init__()
        self.engine, self.model_name, self.store = engine, model_name, store
        # What a new chat starts with (Ctrl+N); an opened chat brings its own.
        self.default_system, self.default_settings = system, settings or SamplingParams()
        self.system, self.settings = self.default_system, self.default_settings
        self.catalog = catalog
        self.export_dir = export_dir or Path.cwd()
        self.info: EngineInfo | None = None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx")
        self.conversation_id: int | None = None
        self.generating = False
        self.editing = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pending: list[ReplyEvent] = []
        self._reply: AssistantMessage | None = None
        self._last_save = 0.0
        self._last_stats: dict[str, Any] = {}
        self.replies_done = 0  # finished replies, for whoever waits on the app (tests)
        # (done, total) as heard, the latest few, for tests and whoever watches the app
        self.prefill_seen: deque[tuple[int, int]] = deque(maxlen=10_000)
        self._prefill_epoch = 0  # bumped to stop a background prefill that lost its chat
        self._prefill_t0 = time.monotonic()
        self._sidebar_toggled = False

    # ---- layout ---------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            yield ListView(id="sidebar")
            with Vertical():
                with Vertical(id="loading"):
                    yield Static(f"Loading {self.model_name} ...", id="loading-text")
                    yield ProgressBar(total=1.0, show_eta=False, id="progress")
                yield VerticalScroll(id="messages")
                yield PromptInput(id="prompt")
            yield ExpertsPanel(classes="hidden", id="experts")
        yield StatusBar(id="status")
        yield Footer()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """While a dialog is open, its keys are its own (quitting still works)."""
        if isinstance(self.screen, ModalScreen) and action in ACTIONS and action != "quit":
            return False
        return True

    def on_resize(self, event) -> None:
        # A narrow terminal gives the conversation the room; Ctrl+B still shows the chats.
        narrow = event.size.width < 100
        self.query_one("#sidebar").set_class(narrow != self._sidebar_toggled, "hidden")

    def on_mount(self) -> None:
        self.query_one("#messages").anchor()
        self.query_one(StatusBar).show(None, note=f"loading {self.model_name} ...")
        self.set_interval(UI_INTERVAL, self._drain)
        self.refresh_sidebar()
        self.worker.submit(self._load)

    def _focus_prompt(self) -> None:
        self.query_one("#prompt", PromptInput).focus()

    def _load(self) -> None:
        def progress(fraction: float) -> None:
            self.call_from_thread(self.query_one("#progress", ProgressBar).update,
                                  progress=fraction)
        try:
            info = self.engine.load(progress)
        except MlxMixtralError as e:
            self.call_from_thread(self._load_failed, str(e))
            return
        except Exception as e:  # noqa: BLE001 - show any failure in the app, no traceback
            self.call_from_thread(self._load_failed, f"{type(e).__name__}: {e}")
            return
        self.call_from_thread(self._loaded, info)

    def _loaded(self, info: EngineInfo) -> None:
        self.info = info
        self.sub_title = info.describe()  # in the header: no toast over the message box
        self.query_one("#loading").add_class("hidden")
        self.query_one("#experts", ExpertsPanel).set_class(not info.is_moe, "hidden")
        if info.is_moe:
            self.query_one("#experts", ExpertsPanel).show(None, None, info.top_k)
        self._status(note="model loaded")
        self._focus_prompt()
        if self.conversation_id is not None:  # a switched model continues the open chat
            self.store.update(self.conversation_id, model=self.model_name)
            self._set_conversation(self._history())

    def _load_failed(self, message: str) -> None:
        self.query_one("#loading-text", Static).update(
            f"[b red]Could not load {self.model_name}[/]\n{message}\n"
            f"Press {key_label('ctrl+o')} to choose another model.")
        self.query_one("#progress").add_class("hidden")
        self.query_one(StatusBar).show(None, note="load failed")

    def _status(self, note: str = "") -> None:
        if not self.query(StatusBar):  # the app is closing: a late timer tick has no bar
            return
        s = self._last_stats
        flags = ", ".join(x for x in ("system prompt" if self.system else "",
                                      changed_settings(self.settings)) if x)
        self.query_one(StatusBar).show(self.info, s.get("generation_tps"), s.get("ttft"),
                                       s.get("context_used", 0), s.get("peak_memory"), note,
                                       flags)

    # ---- conversations --------------------------------------------------------------------

    def refresh_sidebar(self) -> None:
        sidebar = self.query_one("#sidebar", ListView)
        sidebar.clear()
        for i, c in enumerate(self.store.list()):
            # One line each for the title and the model, cut with an ellipsis, never wrapped.
            label = Text(c.title + "\n")
            label.append(Path(c.model).name or c.model, style="dim")
            item = ListItem(Static(label), classes="current" if c.id == self.conversation_id
                            else "")
            item.conversation_id = c.id
            sidebar.append(item)
            if c.id == self.conversation_id:
                sidebar.index = i

    async def on_list_view_selected(self, event: ListView.Selected) -> None:
        conversation_id = getattr(event.item, "conversation_id", None)
        if conversation_id is not None and not self.generating:
            await self.open_conversation(conversation_id)
            self._focus_prompt()

    async def open_conversation(self, conversation_id: int) -> None:
        c = self.store.load(conversation_id)
        if c is None:
            return
        self.conversation_id, self.system, self.editing = c.id, c.system, False
        try:
            self.settings = SamplingParams.from_kwargs(None, **c.settings)
        except MlxMixtralError:
            self.settings = self.default_settings
        # This chat's own numbers: its last reply's, not the previous chat's.
        self._last_stats = next((m.stats for m in reversed(c.messages) if m.stats), None) or {}
        messages = self.query_one("#messages")
        await messages.remove_children()
        for m in c.messages:
            if m.role == "user":
                await messages.mount(UserMessage(m.content, m.id))
            else:
                await messages.mount(AssistantMessage(m.content, m.id, m.status))
        self._set_conversation([{"role": m.role, "content": m.content} for m in c.messages])
        if Path(c.model).name != Path(self.model_name).name:
            self.notify(f"This chat was held with {c.model}; continuing with "
                        f"{self.model_name}.", severity="warning")
        self.refresh_sidebar()
        self._status(note=f"opened “{c.title}”")

    async def open_from_palette(self, conversation_id: int) -> None:
        if not self.generating:
            await self.open_conversation(conversation_id)
            self._focus_prompt()

    def _history(self) -> list[dict[str, str]]:
        return [{"role": "user" if isinstance(w, UserMessage) else "assistant",
                 "content": w.text}
                for w in self.query_one("#messages").children
                if isinstance(w, (UserMessage, AssistantMessage))]

    def _set_conversation(self, history: list[dict[str, str]]) -> None:
        """Hand the open chat to the engine, and read it into the cache in the background."""
        self._prefill_epoch += 1
        if self.info is None:
            return  # the model is loading: `_loaded` hands the chat over
        key = None if self.conversation_id is None else str(self.conversation_id)
        self.worker.submit(self.engine.set_conversation, self.system, history, key)
        if history:
            self._prefill_history()

    def _ensure_conversation(self, first_message: str) -> int:
        if self.conversation_id is None:
            title = " ".join(first_message.split())[:40] or "New chat"
            self.conversation_id = self.store.create(self.model_name, self.system,
                                                     self.settings.to_dict(), title)
            self.worker.submit(self.engine.set_conversation_key, str(self.conversation_id))
            self.refresh_sidebar()
        return self.conversation_id

    def _prefill_history(self) -> None:
        """Read the opened chat into the KV cache on the worker now, while the user reads and
        types, so the next reply does not wait for it."""
        epoch = self._prefill_epoch
        self._prefill_t0 = time.monotonic()

        def run() -> None:
            try:
                context = self.engine.prefill(lambda done, total: self._emit(
                    ReplyEvent(prefill=(done, total))), lambda: self._prefill_epoch != epoch)
            except Exception:  # noqa: BLE001 - the next reply prefills whatever is missing
                return
            if self._prefill_epoch == epoch:
                self._emit(ReplyEvent(prefill=(1, 1), context_used=context))

        self.worker.submit(run)

    def _show_prefill(self, done: int, total: int) -> None:
        what = "reading the prompt" if self._reply is not None else "reading this chat"
        if done >= total:
            note = "generating ... (Esc stops)" if self._reply is not None else "chat ready"
        else:
            elapsed = time.monotonic() - self._prefill_t0
            left = elapsed / max(done, 1) * (total - done)
            note = f"{what}: {done}/{total} tokens, about {left:.0f} s left"
            if self._reply is not None:
                note += " (Esc stops)"
        self._status(note=note)

    # ---- sending and streaming ------------------------------------------------------------

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text.strip()
        if not text or self.generating or self.info is None:
            return
        self.query_one("#prompt", PromptInput).clear()
        messages = self.query_one("#messages")
        action = "send"
        if self.editing:
            self.editing = False
            action = "edit"
            await self._remove_last("assistant")
            await self._remove_last("user")
        cid = self._ensure_conversation(text)
        mid = self.store.add_message(cid, "user", text)
        await messages.mount(UserMessage(text, mid))
        await self._start_reply(action, text)

    async def _start_reply(self, action: str, text: str | None) -> None:
        cid = self.conversation_id
        reply = AssistantMessage("", self.store.add_message(cid, "assistant", "", "streaming"),
                                 status="complete")
        await self.query_one("#messages").mount(reply)
        self.query_one("#messages").anchor()
        self._reply, self.generating = reply, True
        self._stop.clear()
        self._last_save = self._prefill_t0 = time.monotonic()
        settings = self.settings
        self.worker.submit(self._generate, action, text, settings)
        self._status(note="generating ... (Esc stops)")

    def _generate(self, action: str, text: str | None, settings: SamplingParams) -> None:
        try:
            self.engine.reply(action, text, settings, self._emit, self._stop.is_set)
        except Exception as e:  # noqa: BLE001 - shown in the app, never a traceback
            self._emit(ReplyEvent(done=True, finish_reason="error", error=str(e)))

    def _emit(self, event: ReplyEvent) -> None:  # worker thread
        with self._lock:
            self._pending.append(event)

    async def _drain(self) -> None:
        with self._lock:
            events, self._pending = self._pending, []
        if not events:
            return
        progress = [e for e in events if e.prefill is not None]
        self.prefill_seen += [e.prefill for e in progress if e.context_used == 0]
        for e in progress:
            if e.context_used:
                self._last_stats["context_used"] = e.context_used
        if progress:
            last = progress[-1]
            if last.context_used:
                self._status(note="chat ready")
            else:
                self._show_prefill(*last.prefill)
        events = [e for e in events if e.prefill is None]
        if not events or self._reply is None:
            return
        reply = self._reply
        text = "".join(e.text for e in events if not e.done)
        if text:
            await reply.add(text)
        done = next((e for e in events if e.done), None)
        if done is None:
            if time.monotonic() - self._last_save >= SAVE_INTERVAL:
                self.store.update_message(reply.message_id, reply.text, "streaming")
                self._last_save = time.monotonic()
            return
        await self._finish(reply, done)

    async def _finish(self, reply: AssistantMessage, done: ReplyEvent) -> None:
        status = "stopped" if done.finish_reason in ("stopped", "error") else "complete"
        stats = asdict(done.stats) if done.stats else {}
        stats.pop("tokens", None)
        stats.pop("text", None)
        stats["context_used"] = done.context_used
        self.store.update_message(reply.message_id, reply.text, status, stats)
        await reply.finish(status)
        self._reply, self.generating = None, False
        self.replies_done += 1
        self._last_stats = stats
        if done.error:
            self.notify(done.error, title="Generation failed", severity="error")
        if done.expert_share is not None and self.info is not None:
            self.query_one("#experts", ExpertsPanel).show(done.expert_share, done.balance,
                                                          self.info.top_k)
        self._status(note="stopped" if status == "stopped" else "")
        self.refresh_sidebar()

    async def _remove_last(self, role: str) -> str | None:
        kind = UserMessage if role == "user" else AssistantMessage
        widgets = list(self.query_one("#messages").query(kind))
        if not widgets:
            return None
        last = widgets[-1]
        if last.message_id is not None:
            self.store.delete_message(last.message_id)
        await last.remove()
        return last.text

    # ---- actions --------------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.generating:
            self._stop.set()

    async def action_regenerate(self) -> None:
        if self.generating or not list(self.query(AssistantMessage)):
            return
        await self._remove_last("assistant")
        await self._start_reply("regenerate", None)

    def action_edit_last(self) -> None:
        users = list(self.query(UserMessage))
        if self.generating or not users:
            return
        prompt = self.query_one("#prompt", PromptInput)
        prompt.text = users[-1].text
        prompt.move_cursor(prompt.document.end)
        prompt.focus()
        self.editing = True
        self._status(note="editing the last message: Enter resends it")

    async def action_new_chat(self) -> None:
        if self.generating:
            return
        self.conversation_id, self.editing = None, False
        self.system, self.settings = self.default_system, self.default_settings
        self._last_stats = {}
        await self.query_one("#messages").remove_children()
        self._set_conversation([])
        self.refresh_sidebar()
        self._focus_prompt()
        self._status(note="new chat")

    def action_system_prompt(self) -> None:
        def apply(text: str | None) -> None:
            self._focus_prompt()
            if text is None or (text.strip() or None) == self.system:
                return
            self.system = text.strip() or None
            if self.conversation_id is not None:
                self.store.update(self.conversation_id, system=self.system)
            self._set_conversation(self._history())
            self._status(note="system prompt set" if self.system else "no system prompt")

        self.push_screen(SystemPromptScreen(self.system), apply)

    def action_settings(self) -> None:
        def apply(settings: SamplingParams | None) -> None:
            self._focus_prompt()
            if settings is None:
                return
            self.settings = settings
            if self.conversation_id is not None:
                self.store.update(self.conversation_id, settings=settings.to_dict())
            self._status(note="settings saved")

        self.push_screen(SettingsScreen(self.settings), apply)

    def _last_reply(self) -> str | None:
        replies = list(self.query(AssistantMessage))
        return replies[-1].text if replies else None

    def action_copy_reply(self) -> None:
        text = self._last_reply()
        if text:
            self.copy_to_clipboard(text)
            self.notify("Copied the last reply")

    def action_copy_code(self) -> None:
        blocks = CODE_BLOCK.findall(self._last_reply() or "")
        if blocks:
            self.copy_to_clipboard(blocks[-1])
            self.notify("Copied the last code block")
        else:
            self.notify("The last reply has no code block", severity="warning")

    def action_export(self) -> None:
        if self.conversation_id is None:
            self.notify("Nothing to export yet", severity="warning")
            return
        md, js = export(self.store.load(self.conversation_id), self.export_dir)
        self.notify(f"Exported to {md} and {js}")

    def action_delete_chat(self) -> None:
        if self.generating or self.conversation_id is None:
            return
        cid = self.conversation_id
        title = self.store.load(cid).title

        async def answer(yes: bool | None) -> None:
            self._focus_prompt()
            if not yes or self.conversation_id != cid:
                return
            self.store.delete(cid)
            await self.action_new_chat()
            self.notify(f"Deleted “{title}”")

        self.push_screen(ConfirmScreen(f"Delete the chat “{title}”?\nThis cannot be undone.",
                                       "Delete"), answer)

    def action_rename_chat(self) -> None:
        if self.conversation_id is None:
            self.notify("Nothing to rename yet: send a message first", severity="warning")
            return
        cid = self.conversation_id

        def apply(title: str | None) -> None:
            self._focus_prompt()
            if title and title.strip():
                self.store.update(cid, title=" ".join(title.split())[:80])
                self.refresh_sidebar()

        self.push_screen(TextPromptScreen("Rename this chat", self.store.load(cid).title),
                         apply)

    def action_models(self) -> None:
        if self.generating:
            self.notify("Stop the reply first (Esc)", severity="warning")
            return
        from ..loading.memory import available_memory

        self.push_screen(ModelPickerScreen(self.catalog(), self.model_name, available_memory()),
                         self._switch_model)

    def _switch_model(self, name: str | None) -> None:
        self._focus_prompt()
        if not name or (name == self.model_name and self.info is not None):
            return
        self.model_name, self.info = name, None
        self._prefill_epoch += 1
        self.query_one("#loading-text", Static).update(f"Loading {name} ...")
        self.query_one("#progress", ProgressBar).update(progress=0)
        self.query_one("#progress").remove_class("hidden")
        self.query_one("#loading").remove_class("hidden")
        self.query_one(StatusBar).show(None, note=f"loading {name} ...")
        self.worker.submit(self.engine.select, name)
        self.worker.submit(self._load)

    def action_toggle_sidebar(self) -> None:
        self._sidebar_toggled = not self._sidebar_toggled
        self.query_one("#sidebar").toggle_class("hidden")

    def action_toggle_experts(self) -> None:
        if self.info is not None and self.info.is_moe:
            self.query_one("#experts").toggle_class("hidden")

    def action_help(self) -> None:
        self.push_screen(HelpScreen([(key_label(key), text) for key, _, _, text in KEYS]),
                         lambda _: self._focus_prompt())

    async def action_quit(self) -> None:
        self._stop.set()
        self.worker.shutdown(wait=True, cancel_futures=True)
        await self._drain()
        self.exit()

    def on_unmount(self) -> None:
        # However the app ends: stop the generation thread before the interpreter exits, or
        # MLX aborts the process on its way out ("terminate called ...").
        self._stop.set()
        self.worker.shutdown(wait=True, cancel_futures=True)
