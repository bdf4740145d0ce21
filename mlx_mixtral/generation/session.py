"""A conversation kept together with its KV cache, so each turn prefills only what is new.

The conversation is rebuilt as token ids every turn (per-message segments, assistant replies as
the tokens that were generated) and compared with the ids already in the cache: only the part
after the longest common prefix is prefilled. Regenerate and edit-last trim the cache back to
that prefix instead of recomputing it.

Policies:
- Sliding window: the rolling cache keeps memory flat. A trim that reaches behind what it still
  holds (after it wrapped) cannot be exact, so the cache is rebuilt from the conversation.
- Context length: when the conversation plus the reply would outgrow it, the oldest turns are
  dropped (the system prompt stays) and the rest is prefilled again.
- mistral-v3 puts the system prompt in the last user message, so with a system prompt each turn
  also re-prefills the previous user message and reply (the format's choice, kept exactly).
- Caches kept elsewhere (the app's prefix store): `take_cache` starts from one, and `on_chunk`
  hears each prefill chunk, so that blocks are kept while a rolling cache still holds them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx

from ..errors import GenerationError
from ..model.decoder import Model
from ..model.routing import RouterTrace
from ..text.chat_format import clean_text, format_segments
from ..text.tokenizer import Tokenizer
from .kv import KVSettings
from .prefix import reuse_prefix
from .sampling import SamplingParams
from .speculative import Drafter, check_cache_slack
from .stats import Clock, PeakMemory, PrefillStopped, Progress, Stats
from .stream import Chunk, context_length, prefill_chunk, stream_generate


class ChatSession:
    def __init__(self, model: Model, tokenizer: Tokenizer, system: str | None = None,
                 chat_format: str | None = None, sampling: SamplingParams | None = None,
                 kv: KVSettings | None = None, draft: Drafter | None = None,
                 **settings: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.chat_format = chat_format or tokenizer.chat_format
        self.sampling = SamplingParams.from_kwargs(sampling, **settings)
        self.messages: list[dict[str, str]] = []  # user / assistant turns
        # Each assistant turn's tokens as generated (None: not generated here, so re-encoded).
        self.reply_ids: list[list[int] | None] = []
        self.kv, self.draft = kv, draft
        self.cache = self._fresh_cache()
        self.cached: list[int] = []  # the token ids whose keys/values are in the cache
        self.last_stats: Stats | None = None
        self.prefill_step: int | None = None  # prompt tokens per forward pass (None: default)
        # The prefill's speed on the last chunk read (None: none read yet), which bounds the
        # chunks of a prefill that may be stopped (model/limits.py).
        self.seconds_per_token: float | None = None
        # Hears (the ids the cache holds, the cache) after each prefill chunk: the prefix store
        # keeps its blocks then, since a rolling cache holds only its last window.
        self.on_chunk: Callable[[list[int], list], None] | None = None

    def load_messages(self, messages: list[dict[str, str]], system: str | None = None) -> None:
        """Continue a stored conversation: its replies are re-encoded, the cache starts empty."""
        self._set_messages(messages, system, {})
        self.cache, self.cached = self._fresh_cache(), []

    def sync(self, messages: list[dict[str, str]], system: str | None = None) -> None:
        """Go on with `messages`, the whole conversation as its owner now has it (a reply
        regenerated, a message edited): replies kept from before keep the tokens they were
        generated as, and the next turn prefills only what differs from the cache."""
        self._set_messages(messages, system, dict(self.replies_state()))

    def _set_messages(self, messages: list[dict[str, str]], system: str | None,
                      generated: dict[str, list[int]]) -> None:
        self.system = system
        self.messages = [{"role": m["role"], "content": clean_text(m["content"])}
                         for m in messages if m["role"] in ("user", "assistant")]
        self.reply_ids = [generated.get(m["content"]) for m in self.messages
                          if m["role"] == "assistant"]

    # ---- the conversation as tokens -------------------------------------------------------

    def _all_messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def conversation_ids(self) -> list[int]:
        """The whole conversation, formatted, with replies as the tokens generated."""
        segments = format_segments(self.tokenizer, self._all_messages(),
                                   chat_format=self.chat_format)
        replies = iter(self.reply_ids)
        ids: list[int] = []
        for segment in segments:
            if segment.role == "assistant":
                generated = next(replies, None)
                ids.extend(generated if generated is not None else segment.ids)
            else:
                ids.extend(segment.ids)
        return ids

    def _fit_context(self, reserve: int) -> list[int]:
        """Drop the oldest turns (keeping the system prompt) until the reply fits."""
        ids = self.conversation_ids()
        while len(ids) + reserve >= context_length(self.model) and len(self.messages) > 1:
            turn = 2 if self.messages[1]["role"] == "assistant" else 1  # a user + its reply
            del self.reply_ids[: turn - 1]
            del self.messages[:turn]
            ids = self.conversation_ids()
        return ids

    def _sync_cache(self, ids: list[int]) -> list[int]:
        """Trim the cache to the common prefix with `ids`; return the ids still to prefill."""
        self.cache, common = reuse_prefix(self.cache, self.cached, ids, self._fresh_cache)
        self.cached = self.cached[:common]
        return ids[common:]

    def _fresh_cache(self) -> list:
        return self.model.make_cache(slack=self.draft.k if self.draft else 0)

    def replies_state(self) -> list[list]:
        """Each reply's text with the tokens it was generated as, for `adopt_replies`."""
        replies = [m["content"] for m in self.messages if m["role"] == "assistant"]
        return [[text, ids] for text, ids in zip(replies, self.reply_ids, strict=True)
                if ids is not None]

    def adopt_replies(self, replies: list[list]) -> None:
        """Restore the tokens the replies were generated as, from `replies` ([text, token
        ids] from `replies_state`; re-encoding their text could tokenize differently)."""
        known = {text: ids for text, ids in replies if isinstance(text, str)
                 and isinstance(ids, list) and all(isinstance(i, int) for i in ids)}
        texts = [m["content"] for m in self.messages if m["role"] == "assistant"]
        self.reply_ids = [known.get(text, ids) for text, ids in
                          zip(texts, self.reply_ids, strict=True)]

    def adopt_cache(self, cache: list, tokens: list[int],
                    replies: list[list] | None = None) -> None:
        """Continue from a saved cache holding `tokens` (after `load_messages`): the next turn
        prefills only what follows the longest prefix it shares with the conversation.
        `replies`: as `adopt_replies` takes them."""
        if not cache or cache[0].offset != len(tokens):
            raise GenerationError("the cache and its tokens disagree")
        if self.draft is not None:
            check_cache_slack(cache, self.draft.k)
        self.adopt_replies(replies or [])
        self.cache, self.cached = cache, list(tokens)

    def take_cache(self, take: Callable[[list[int], Callable[[], list]], tuple[list, int]]
                   ) -> int:
        """Continue from the cache `take(ids, fresh)` rebuilds for the conversation's ids (the
        prefix store's `take`: a cache holding ids[:n], and n); return n."""
        ids = self.conversation_ids()
        cache, n = take(ids, self._fresh_cache)
        if n:
            self.adopt_cache(cache, ids[:n])
        return n

    # ---- turns ----------------------------------------------------------------------------

    def prefill(self, progress: Progress | None = None,
                should_stop: Callable[[], bool] | None = None) -> int:
        """Read the conversation so far into the cache, chunk by chunk, before the next
        message is typed; return how many tokens were read. Stopping between chunks keeps
        what was read (the cache always holds a prefix of the conversation)."""
        ids = self._fit_context(reserve=64)
        new = self._sync_cache(ids)
        done = 0
        timed = self._timed(progress)
        while done < len(new):
            if should_stop is not None and should_stop():
                break
            step = prefill_chunk(self.model, self.prefill_step, should_stop is not None,
                                 self.seconds_per_token)
            chunk = new[done:done + step]
            self.model(mx.array([chunk]), cache=self.cache)
            mx.eval([c.state for c in self.cache])
            done += len(chunk)
            self.cached = ids[:len(self.cached) + len(chunk)]
            if self.on_chunk is not None:
                self.on_chunk(self.cached, self.cache)
            timed(done, len(new))
        return done

    def _timed(self, progress: Progress | None) -> Progress:
        """`progress`, measuring the prefill's speed (`seconds_per_token`) on each chunk (from
        now, or from its call at 0 tokens)."""
        last = [time.perf_counter(), 0]

        def timed(done: int, total: int) -> None:
            now = time.perf_counter()
            if done > last[1]:
                self.seconds_per_token = (now - last[0]) / (done - last[1])
            last[:] = [now, done]
            if progress is not None:
                progress(done, total)

        return timed

    def _chunks(self, new: list[int], progress: Progress | None) -> Progress | None:
        """The progress `stream_generate` hears while it prefills `new` after the cached ids:
        `progress`, timed, and `on_chunk` after each chunk (not at the end, when the first
        generated token's step is already queued in the cache)."""
        timed = progress and self._timed(progress)
        if self.on_chunk is None:
            return timed
        held, keep = list(self.cached), self.on_chunk

        def chunked(done: int, total: int) -> None:
            if 0 < done < total:
                keep(held + new[:done], self.cache)
            if timed is not None:
                timed(done, total)

        return chunked

    def _reply(self, sampling: SamplingParams | None = None, progress: Progress | None = None,
               router_trace: RouterTrace | None = None,
               **settings: Any) -> Iterator[Chunk | Stats]:
        params = SamplingParams.from_kwargs(sampling or self.sampling, **settings)
        ids = self._fit_context(reserve=min(params.max_tokens, 64))
        new = self._sync_cache(ids)
        tokens: list[int] = []
        text = ""
        stats = None
        clock, peak = Clock(), PeakMemory()
        try:
            # A prefill the caller may stop (its progress raises PrefillStopped) reads chunks
            # short enough to stop soon, at the speed measured before.
            step = prefill_chunk(self.model, self.prefill_step, progress is not None,
                                 self.seconds_per_token)
            for item in stream_generate(self.model, self.tokenizer, new, sampling=params,
                                        cache=self.cache, history=self.cached, kv=self.kv,
                                        draft=self.draft,
                                        progress=self._chunks(new, progress),
                                        router_trace=router_trace, prefill_step_size=step):
                clock.first_token()
                if isinstance(item, Stats):
                    stats = item
                    tokens, text = item.tokens, item.text
                else:
                    if item.token is not None:
                        tokens.append(item.token)
                    text += item.text
                yield item
        except PrefillStopped:
            clock.first_token()  # the turn ends here, empty: the cache keeps what was read
            stats = clock.stats(len(new), [], "", "stopped", peak.bytes())
            yield Chunk("", None, "stopped")
        finally:
            if clock.first is not None:
                if stats is None:  # stopped by the caller: the numbers so far
                    stats = clock.stats(len(new), tokens, text, "stopped", peak.bytes())
                self._record(ids, tokens, text, stats)

    def _record(self, ids: list[int], tokens: list[int], text: str, stats: Stats) -> None:
        """Book a reply, also one the caller stopped early: the cache then holds the prompt and
        every token streamed so far."""
        self.cached = (ids + tokens)[:self.cache[0].offset]
        reply = tokens if tokens[-1:] and tokens[-1] in self.tokenizer.eos_ids else (
            tokens + [self.tokenizer.eos_id])  # the format ends a reply with EOS
        self.messages.append({"role": "assistant", "content": text})
        self.reply_ids.append(reply)
        self.last_stats = stats

    def reply(self, **settings: Any) -> Iterator[Chunk | Stats]:
        """Stream a reply to the conversation as it stands (after `sync`, say): its last
        message is the user's."""
        if not self.messages or self.messages[-1]["role"] != "user":
            raise GenerationError("the conversation does not end with a user message")
        return self._reply(**settings)

    def send(self, text: str, **settings: Any) -> Iterator[Chunk | Stats]:
        """Add a user message and stream the reply (`Chunk`s, then `Stats`). `settings`:
        sampling, `progress` and `router_trace` as `stream_generate` takes them (so for
        `regenerate` and `edit_last`)."""
        self.messages.append({"role": "user", "content": clean_text(text)})
        return self._reply(**settings)

    def regenerate(self, **settings: Any) -> Iterator[Chunk | Stats]:
        """Replace the last reply with a new one."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise GenerationError("there is no reply to regenerate")
        self.messages.pop()
        self.reply_ids.pop()
        return self._reply(**settings)

    def edit_last(self, text: str, **settings: Any) -> Iterator[Chunk | Stats]:
        """Replace the last user message (and its reply), and stream the new reply."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
            self.reply_ids.pop()
        if not self.messages or self.messages[-1]["role"] != "user":
            raise GenerationError("there is no user message to edit")
        self.messages[-1] = {"role": "user", "content": clean_text(text)}
        return self._reply(**settings)
