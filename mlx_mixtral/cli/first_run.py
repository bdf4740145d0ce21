"""The first `mlx-mixtral chat` with no model set up: offer a real model, with consent.

Online, the user is asked once whether to download Mistral 7B Instruct (4-bit, MLX) from the
Hugging Face hub; the answer is kept in the user config, so nobody is asked twice. Offline, or
on a "no", the chat opens on the offline demo model with one line on how to get a real one
(offline: on the first start only; the config remembers it). What is said goes to `say`: the
chat app shows it in the empty chat, where it is seen (printed before a full-screen app starts,
it would stay hidden until quitting).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from ..loading.locate import download, hub_download_size
from ..loading.memory import available_memory
from ..units import size
from ..user_files import update_user_config, user_config

OFFER = "mlx-community/Mistral-7B-Instruct-v0.3-4bit"
HOW_TO_GET = (f"to chat with Mistral later: mlx-mixtral chat --model {OFFER} (or convert Mixtral: "
              "mlx-mixtral convert --help)")


def needs_offer() -> bool:
    """No model named anywhere, and the question never answered."""
    config = user_config()
    return not (os.environ.get("MLX_MIXTRAL_MODEL") or config.get("model")
                or config.get("first_run"))


def offer_model(ask: Callable[[str], str] = input,
                say: Callable[[str], None] = lambda s: print(s, file=sys.stderr)
                ) -> str | None:
    """The model to open: the offered one once downloaded, or None for the demo."""
    total = hub_download_size(OFFER)
    if total is None:  # asked again when online; the hint is said once
        if not user_config().get("offline_hint"):
            update_user_config(offline_hint="shown")
            say(f"Offline: opening the demo model; {HOW_TO_GET}")
        return None
    have = available_memory()
    if have and total > have:
        say(f"This machine has {size(have)} free, too little for Mistral 7B ({size(total)}); "
            "opening the demo model")
        update_user_config(first_run="too little memory")
        return None
    try:
        answer = ask(f"No model is set up yet. Download Mistral 7B Instruct v0.3 (4-bit, MLX, "
                     f"{size(total)}) from Hugging Face? [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        update_user_config(first_run="declined")
        say(f"Opening the demo model; {HOW_TO_GET}")
        return None
    download(OFFER)  # huggingface-hub shows the progress bars
    path = update_user_config(model=OFFER, first_run="accepted")
    say(f"Downloaded. {OFFER} is now your default model (set in {path}).")
    return OFFER
