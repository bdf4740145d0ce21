"""Shared by the app tests: a tiny real Mixtral folder with the Mistral v1 tokenizer, a fake
engine, and waiting on the app."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from mlx_mixtral.app.engine import EngineInfo, ModelList
from mlx_mixtral.generation.stats import Chunk, Stats

TINY_MIXTRAL = dict(model_type="mixtral", vocab_size=32000, hidden_size=64,
                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                    max_position_embeddings=4096, sliding_window=256)


def tiny_model_folder(folder: Path) -> Path:
    """A tiny random Mixtral with the real Mistral v1 tokenizer ([INST] chat format)."""
    # Imported here: the chat driver, a process of its own, imports this module for
    # `wait_until`, and mistral-common (test_chat_format's tokenizer paths) costs it a second.
    import mlx.core as mx
    from test_chat_format import VERSIONS

    from mlx_mixtral import ModelArgs
    from mlx_mixtral.convert.synthetic import write_hf_checkpoint

    write_hf_checkpoint(folder, ModelArgs.from_dict(TINY_MIXTRAL), dtype=mx.float32, seed=3)
    shutil.copyfile(VERSIONS["mistral-v1"], folder / "tokenizer.model")
    return folder


async def wait_until(pilot, predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.05)


async def ready(pilot) -> None:
    """Until the model is loaded."""
    await wait_until(pilot, lambda: pilot.app.info is not None)


async def send(pilot, text: str) -> None:
    """Type `text` in the message box, send it, and wait for the reply to finish."""
    from mlx_mixtral.app.widgets import PromptInput

    app = pilot.app
    prompt = app.query_one(PromptInput)
    prompt.focus()
    prompt.text = text
    done = app.replies_done
    await pilot.press("enter")
    await wait_until(pilot, lambda: app.replies_done > done)


async def settle(pilot) -> None:
    """Until the app has nothing left to do: animations done, message queues empty."""
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


class FakeEngine:
    """Deterministic replies and numbers, for screenshots."""

    def __init__(self, moe: bool = True, reply: str = "Hello! Here is some code:\n\n"
                 "```python\nprint('hi')\n```\n\nAnything else?",
                 models: ModelList | None = None) -> None:
        self.info = EngineInfo(name="fake-mixtral", parameters=46_700_000_000,
                               active_parameters=12_900_000_000, quantization="4-bit",
                               memory_bytes=26_000_000_000, is_moe=moe, layers=4,
                               experts=8 if moe else 0, top_k=2 if moe else 0,
                               context=32768, chat_format="mistral-v1")
        self.reply_text = reply
        self.offer = models or ModelList([])
        self.prompts: list = []  # every prompt answered
        self.delay = 0.0

    def load(self, progress):
        progress(1.0)
        return self.info

    def models(self):
        return self.offer

    def prefill(self, prompt, emit, should_stop):
        return 0

    def select(self, name):
        self.info.name = name

    def reply(self, prompt, settings, emit, should_stop):
        self.prompts.append(prompt)
        words = self.reply_text.split(" ")
        sent = 0
        for i, word in enumerate(words):
            if should_stop():
                break
            emit(Chunk(word if i == 0 else " " + word, None))
            sent += 1
            if self.delay:
                time.sleep(self.delay)
        share = [[0.5, 0.1, 0.3, 0.2, 0.4, 0.1, 0.3, 0.1]] * 4 if self.info.is_moe else None
        emit(Stats(prompt_tokens=12, prompt_tps=100.0, generation_tokens=sent,
                   generation_tps=42.0, ttft=0.25, peak_memory=2_500_000_000,
                   finish_reason="stopped" if sent < len(words) else "stop", context_used=40,
                   expert_share=share, balance=1.07))
