"""A job's events as the Messages and Responses APIs send them: text deltas as they come, then
an `Ending` with the tool calls (a reply that starts with the call token is held back and
parsed whole) and why it ended, stop sequence included."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ..generation.stats import Chunk, Stats
from ..text.tool_formats import ToolCallReply


@dataclass
class Ending:
    done: Stats
    calls: list[dict[str, Any]] | None  # OpenAI-shaped tool calls, when the reply is calls
    text: str  # the whole reply's text (for calls: "")
    held: str  # text held back that turned out not to be a call: still to be sent


def ending(done: Stats, first_token: int | None, text: str,
           tool_calls: ToolCallReply) -> Ending:
    calls = tool_calls.calls(first_token, text)
    called = tool_calls.starts(first_token)
    return Ending(done, calls, "" if calls else text, text if called and not calls else "")


async def reply_parts(events: AsyncIterator[Chunk | Stats], tool_calls: ToolCallReply
                      ) -> AsyncIterator[str | Ending]:
    """Text deltas, then the `Ending` (nothing more if the client left). Closing it (or an
    error from the job) cancels the job."""
    held: list[str] | None = None
    text: list[str] = []
    first_token = None
    try:
        async for event in events:
            if isinstance(event, Stats):
                yield ending(event, first_token, "".join(text), tool_calls)
                return
            if event.token is not None and first_token is None:
                first_token = event.token
                held = [] if tool_calls.starts(first_token) else None
            text.append(event.text)
            if held is None and event.text:
                yield event.text
    finally:
        await events.aclose()


async def started(events: AsyncIterator[Chunk | Stats]) -> AsyncIterator[Chunk | Stats]:
    """`events` once the first has come, so that a failure to start (a full queue) is still
    an HTTP status before a stream's headers go out; that event is put back in front."""
    first = await anext(events, None)

    async def again() -> AsyncIterator[Chunk | Stats]:
        try:
            if first is not None:
                yield first
                async for event in events:
                    yield event
        finally:
            await events.aclose()

    return again()


def stop_sequence(tokenizer: Any, done: Stats, text: str, stops: list[str]) -> str | None:
    """The stop string that ended the reply (None: an end token, the length, or no stops)."""
    if done.finish_reason != "stop" or not stops:
        return None
    if done.tokens and done.tokens[-1] in tokenizer.eos_ids:
        return None
    whole = tokenizer.decode(done.tokens)
    after = whole[len(text):] if whole.startswith(text) else whole
    hits = [(after.find(s), s) for s in stops if s in after]
    return min(hits)[1] if hits else None
