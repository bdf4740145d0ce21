"""The chat app's actions that ask in a dialog (another model, system prompt, settings, rename,
delete, help), act on the open chat as a whole (copy, export) or show and hide a part of the
view. A part of `ChatApp`, kept here so that the app module reads as layout and the flow of
loading and replying."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual.screen import Screen

from ..errors import MlxMixtralError
from ..generation.sampling import SamplingParams
from .engine import Engine, EngineInfo, ModelList
from .export import export
from .keys import KEYS, key_label
from .screens import (
    ConfirmScreen,
    HelpScreen,
    ModelPickerScreen,
    SettingsScreen,
    SystemPromptScreen,
    TextPromptScreen,
)
from .widgets import ChatList, ExpertsPanel, MessageList, PromptInput

if TYPE_CHECKING:
    from .conversation import Conversation
    from .store import Store


class ChatActions:
    """Mixed into `ChatApp` (a Textual `App`), whose conversation, store and status it uses."""

    conversation: Conversation
    engine: Engine
    model_name: str
    store: Store
    export_dir: Path
    generating: bool
    info: EngineInfo | None

    def _ask(self, screen: Screen, then: Callable[[Any], Any] | None = None) -> None:
        """Show a dialog; typing goes back to the prompt after it, and its answer (unless
        cancelled) to `then`."""
        async def answered(answer: Any) -> None:
            self._focus_prompt()
            pending = None
            if then is not None and answer is not None and answer is not False:
                pending = then(answer)
            if pending is not None:
                await pending

        self.push_screen(screen, answered)

    def action_system_prompt(self) -> None:
        def apply(text: str) -> None:
            if self.conversation.set_system(text):
                self._prefill()
                self._status(note="system prompt set" if self.conversation.system
                             else "no system prompt")

        self._ask(SystemPromptScreen(self.conversation.system), apply)

    def action_settings(self) -> None:
        def apply(settings: SamplingParams) -> None:
            self.conversation.set_settings(settings)
            self._status(note="settings saved")

        self._ask(SettingsScreen(self.conversation.settings), apply)

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
        self._copy(self.conversation.last_code_block(), "Copied the last code block",
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

        async def delete(_: bool) -> None:
            if self.conversation.id == cid:
                key = self.conversation.prompt().key
                self.conversation.delete()
                if key is not None:
                    self.worker.forget(key)  # its blocks too (those no other chat uses)
                await self.action_new_chat()
                self.notify(f"Deleted “{title}”")

        self._ask(ConfirmScreen(f"Delete the chat “{title}”?\nThis cannot be undone.",
                                "Delete"), delete)

    def action_rename_chat(self) -> None:
        if self.conversation.id is None:
            self.notify("Nothing to rename yet: send a message first", severity="warning")
            return

        def rename(title: str) -> None:
            self.conversation.rename(title)
            self.refresh_sidebar()

        self._ask(TextPromptScreen("Rename this chat", self.conversation.title()), rename)

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
        self._ask(ModelPickerScreen(offer, self.model_name), self._switch_model)

    def action_help(self) -> None:
        self._ask(HelpScreen([(key_label(key), text) for key, _, _, text in KEYS]))

    # ---- the view ---------------------------------------------------------------------------

    def on_prompt_input_page(self, event: PromptInput.Page) -> None:
        """PageUp / PageDown in the message box scroll the conversation."""
        messages = self.query_one(MessageList)
        messages.scroll_page_up() if event.pages < 0 else messages.scroll_page_down()

    def action_toggle_sidebar(self) -> None:
        self.query_one(ChatList).toggle()

    def action_toggle_experts(self) -> None:
        if self.info is None:
            return
        if not self.info.is_moe:
            self.notify(f"{self.info.name} has no experts: it is a dense model (the panel is "
                        "for a mixture of experts such as Mixtral)", severity="warning")
            return
        self.query_one(ExpertsPanel).toggle_class("hidden")
