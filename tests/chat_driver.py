"""Drive the real chat app (headless) on a model and database: send messages one after another
and wait for each reply. Prints "ready" once the model is loaded, then waits for a line on
stdin before sending (so a test can start the next one while another runs). Used by the fault
tests, which run it in processes of their own and kill them.

    python chat_driver.py MODEL DB TAG ROUNDS MAX_TOKENS
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from app_helpers import wait_until

from mlx_mixtral.app.chat_app import ChatApp
from mlx_mixtral.app.chat_prefixes import ChatPrefixes
from mlx_mixtral.app.mlx_engine import MlxEngine
from mlx_mixtral.app.store import Store
from mlx_mixtral.app.widgets import PromptInput
from mlx_mixtral.generation.sampling import SamplingParams


async def drive(model: str, db: str, tag: str, rounds: int, max_tokens: int) -> None:
    settings = SamplingParams(temperature=1.0, max_tokens=max_tokens)
    store = Store(db)  # and the prefix store, as `chat` has them
    app = ChatApp(MlxEngine(model, prefixes=ChatPrefixes(Path(db))), model, store,
                  settings=settings)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: app.info is not None, timeout=120)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # "go"
        for i in range(rounds):
            done = app.replies_done
            prompt = app.query_one(PromptInput)
            prompt.focus()
            prompt.text = f"{tag} message {i}"
            await pilot.press("enter")
            await wait_until(pilot, lambda done=done: app.replies_done > done, timeout=120)
            print(f"replied {i}", flush=True)


if __name__ == "__main__":
    model, db, tag, rounds, max_tokens = sys.argv[1:6]
    asyncio.run(drive(model, db, tag, int(rounds), int(max_tokens)))
