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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Footer, Header, ListItem, ListView, ProgressBar, Static

from ..errors import MlxMixtralError
from ..generation.sampling import SamplingParams
from .engine import Engine, EngineInfo, ReplyEvent
from .export import export
from .screens import HelpScreen, SettingsScreen, SystemPromptScreen
from .store import Store
from .widgets import AssistantMessage, ExpertsPanel, PromptInput, StatusBar, UserMessage

UI_INTERVAL = 0.05  # seconds between UI updates while streaming (about 20 a second)
SAVE_INTERVAL = 1.0  # seconds between saves of the reply being streamed
CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.S)

KEYS = [  # (key, action, footer label, help text): the help screen lists them all
    ("enter", None, "", "send the message"),
    ("ctrl+j", None, "", "new line in the message (also Shift+Enter where the terminal has it)"),
    ("escape", "stop", "stop", "stop the reply (it is kept, marked as stopped)"),
    ("ctrl+r", "regenerate", "regenerate", "regenerate the last reply"),
    ("ctrl+e", "edit_last", "edit last", "edit the last message and send it again"),
    ("ctrl+n", "new_chat", "new chat", "start a new chat"),
    ("f2", "system_prompt", "system", "edit the system prompt"),
    ("f3", "settings", "settings", "temperature, top-p, top-k, min-p, max tokens, penalty, seed"),
    ("ctrl+y", "copy_reply", "copy", "copy the last reply (OSC 52)"),
    ("ctrl+k", "copy_code", "copy code", "copy the last code block of the last reply (OSC 52)"),
    ("f5", "export", "export", "export this chat to Markdown and JSON (current folder)"),
    ("ctrl+d", "delete_chat", "delete", "delete this chat"),
    ("ctrl+b", "toggle_sidebar", "chats", "show / hide the list of chats"),
    ("f4", "toggle_experts", "experts", "show / hide the experts panel (Mixtral)"),
    ("f1", "help", "help", "this help"),
    ("ctrl+q", "quit", "quit", "quit"),
]
FOOTER_KEYS = ("escape", "ctrl+r", "ctrl+e", "ctrl+n", "f2", "f3", "f1", "ctrl+q")


class ChatApp(App):
    TITLE = "mlx-mixtral"
    CSS = """
    #main { height: 1fr; }
    #sidebar { width: 28; border-right: solid $primary; }
    #sidebar.hidden, ExpertsPanel.hidden { display: none; }
    #messages { height: 1fr; padding: 0 1; }
    PromptInput { height: 5; border: round $accent; }
    #loading { height: auto; padding: 1 2; }
    #loading.hidden { display: none; }
    """
    BINDINGS = [Binding(key, action, label, priority=True, show=key in FOOTER_KEYS)
                for key, action, label, _ in KEYS if action]

    def __init__(self, engine: Engine, model_name: str, store: Store, system: str | None = None,
                 settings: SamplingParams | None = None, export_dir: Path | None = None) -> None:
        super().__init__()
        self.engine, self.model_name, self.store = engine, model_name, store
        self.system = system
        self.settings = settings or SamplingParams()
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
        self.prefill_seen: list[tuple[int, int]] = []  # (done, total) as heard, for tests
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
        self.sub_title = info.describe()
        self.query_one("#loading").add_class("hidden")
        self.query_one("#experts", ExpertsPanel).set_class(not info.is_moe, "hidden")
        if info.is_moe:
            self.query_one("#experts", ExpertsPanel).show(None, None, info.top_k)
        self._status()
        self.notify(info.describe(), title="Model loaded")
        self.query_one("#prompt").focus()

    def _load_failed(self, message: str) -> None:
        self.query_one("#loading-text", Static).update(
            f"[b red]Could not load {self.model_name}[/]\n{message}")
        self.query_one("#progress").add_class("hidden")
        self.query_one(StatusBar).show(None, note=f"load failed: {message}")

    def _status(self, note: str = "") -> None:
        s = self._last_stats
        self.query_one(StatusBar).show(self.info, s.get("generation_tps"), s.get("ttft"),
                                       s.get("context_used", 0), s.get("peak_memory"), note)

    # ---- conversations --------------------------------------------------------------------

    def refresh_sidebar(self) -> None:
        sidebar = self.query_one("#sidebar", ListView)
        sidebar.clear()
        for c in self.store.list():
            item = ListItem(Static(f"{c.title}\n[dim]{Path(c.model).name}[/]"))
            item.conversation_id = c.id
            sidebar.append(item)

    async def on_list_view_selected(self, event: ListView.Selected) -> None:
        conversation_id = getattr(event.item, "conversation_id", None)
        if conversation_id is not None and not self.generating:
            await self.open_conversation(conversation_id)

    async def open_conversation(self, conversation_id: int) -> None:
        c = self.store.load(conversation_id)
        if c is None:
            return
        self.conversation_id, self.system = c.id, c.system
        try:
            self.settings = SamplingParams.from_kwargs(None, **c.settings)
        except MlxMixtralError:
            self.settings = SamplingParams()
        messages = self.query_one("#messages")
        await messages.remove_children()
        for m in c.messages:
            if m.role == "user":
                await messages.mount(UserMessage(m.content, m.id))
            else:
                await messages.mount(AssistantMessage(m.content, m.id, m.status))
        history = [{"role": m.role, "content": m.content} for m in c.messages]
        self._prefill_epoch += 1
        self.worker.submit(self.engine.set_conversation, self.system, history, str(c.id))
        if history:
            self._prefill_history()
        if Path(c.model).name != Path(self.model_name).name:
            self.notify(f"This chat was held with {c.model}; continuing with "
                        f"{self.model_name}.", severity="warning")
        self._status(note=f"opened “{c.title}”")

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
                self.engine.prefill(lambda done, total: self._emit(
                    ReplyEvent(prefill=(done, total))), lambda: self._prefill_epoch != epoch)
            except Exception:  # noqa: BLE001 - the next reply prefills whatever is missing
                pass

        self.worker.submit(run)

    def _show_prefill(self, done: int, total: int) -> None:
        what = "reading the prompt" if self._reply is not None else "reading this chat"
        if done >= total:
            note = "generating ... (Esc stops)" if self._reply is not None else (
                f"chat ready ({total} tokens read)")
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
        progress = [e.prefill for e in events if e.prefill is not None]
        self.prefill_seen += progress
        if progress:
            self._show_prefill(*progress[-1])
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
        prompt.focus()
        self.editing = True
        self._status(note="editing the last message: Enter resends it")

    async def action_new_chat(self) -> None:
        if self.generating:
            return
        self.conversation_id, self.editing = None, False
        self._prefill_epoch += 1
        await self.query_one("#messages").remove_children()
        self.worker.submit(self.engine.set_conversation, self.system, [])
        self._status(note="new chat")

    def action_system_prompt(self) -> None:
        def apply(text: str | None) -> None:
            if text is None:
                return
            self.system = text.strip() or None
            if self.conversation_id is not None:
                self.store.update(self.conversation_id, system=self.system)
            history = [{"role": "user" if isinstance(w, UserMessage) else "assistant",
                        "content": w.text}
                       for w in self.query_one("#messages").children
                       if isinstance(w, (UserMessage, AssistantMessage))]
            key = None if self.conversation_id is None else str(self.conversation_id)
            self.worker.submit(self.engine.set_conversation, self.system, history, key)
            self._status(note="system prompt set")

        self.push_screen(SystemPromptScreen(self.system), apply)

    def action_settings(self) -> None:
        def apply(settings: SamplingParams | None) -> None:
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

    async def action_delete_chat(self) -> None:
        if self.generating or self.conversation_id is None:
            return
        self.store.delete(self.conversation_id)
        await self.action_new_chat()
        self.refresh_sidebar()
        self.notify("Chat deleted")

    def action_toggle_sidebar(self) -> None:
        self._sidebar_toggled = not self._sidebar_toggled
        self.query_one("#sidebar").toggle_class("hidden")

    def action_toggle_experts(self) -> None:
        if self.info is not None and self.info.is_moe:
            self.query_one("#experts").toggle_class("hidden")

    def action_help(self) -> None:
        self.push_screen(HelpScreen([(key.replace("ctrl+", "Ctrl+").title(), text)
                                     for key, _, _, text in KEYS]))

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
