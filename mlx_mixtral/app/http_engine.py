"""The chat app's engine over HTTP: any OpenAI-compatible server (ours, mlx-lm's, Ollama's,
llama.cpp's) behind the same narrow interface as `MlxEngine`. It imports no MLX.

Each request sends the whole conversation; a server that keeps caches between requests (ours
does) prefills only what is new. Replies stream as server-sent events; Esc closes the stream,
which stops the generation on our server. Ctrl+O lists the server's models (/v1/models).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..catalog.local import LocalModel
from ..errors import MlxMixtralError
from ..generation.sampling import SETTINGS, SamplingParams
from ..generation.stats import Chunk, Stats
from .engine import Emit, EngineInfo, ModelList, Prompt, ShouldStop

TIMEOUT = 600.0  # seconds without a byte before giving up (a long prompt on a slow machine)


def api_base(url: str) -> str:
    """http://host:port, http://host:port/ or http://host:port/v1 -> http://host:port/v1"""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise MlxMixtralError(f"--server wants a URL like http://127.0.0.1:8080, got {url!r}")
    return url if url.endswith("/v1") else url + "/v1"


def served_context(entry: dict[str, Any]) -> int:
    """A /v1/models entry's context length, under the names servers give it (ours and
    OpenRouter's, vLLM's, llama.cpp's); 0 when it says none."""
    meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
    for value in (entry.get("context_length"), entry.get("max_model_len"),
                  meta.get("n_ctx_train")):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def _error_text(body: bytes, status: int) -> str:
    try:
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return f"the server answered {status}: {message or body[:200].decode('utf-8', 'replace')}"


class HttpEngine:
    def __init__(self, url: str, api_key: str | None = None, model: str | None = None,
                 given: Iterable[str] = ()) -> None:
        """`given`: the sampling settings the user set (flags); a setting left at its default
        is not sent, so the server applies its model's own (ours: the demo's gentler ones)."""
        import httpx

        self.base = api_base(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(TIMEOUT, connect=10))
        self.model, self.given = model, frozenset(given)
        self.info = EngineInfo(name=model or self.base, server=self.base)

    def _get(self, path: str) -> Any:
        import httpx

        try:
            r = self.http.get(self.base + path)
        except httpx.HTTPError as e:
            raise MlxMixtralError(f"cannot reach {self.base}: {e}") from None
        if r.status_code != 200:
            raise MlxMixtralError(_error_text(r.content, r.status_code))
        return r.json()

    def _served(self) -> dict[str, int]:
        """The models the server serves (GET /v1/models): each id with its context length, as
        far as the server says it (0: not said)."""
        data = self._get("/models").get("data")
        if not isinstance(data, list):
            return {}
        return {str(m["id"]): served_context(m) for m in data
                if isinstance(m, dict) and m.get("id")}

    def models(self) -> ModelList:
        return ModelList([LocalModel(name, "server", 0, 0) for name in self._served()],
                         server=self.base)

    def load(self, progress: Callable[[float], None]) -> EngineInfo:
        """Nothing loads: the served model is checked and named (its id, never the URL)."""
        served = self._served()
        if not served:
            raise MlxMixtralError(f"{self.base} serves no model")
        if self.model is None:
            self.model = next(iter(served))
        elif self.model not in served:
            raise MlxMixtralError(f"{self.base} does not serve {self.model!r}; it serves "
                                  f"{', '.join(served)}")
        progress(1.0)
        self.info = EngineInfo(name=self.model, server=self.base, source=self.model,
                               context=served[self.model])
        return self.info

    def select(self, name: str) -> None:
        self.model = name  # the next load() checks that the server has it

    def forget(self, key: str) -> None:
        pass  # the server keeps no chat by its id here: nothing to delete

    def prefill(self, prompt: Prompt, emit: Emit, should_stop: ShouldStop) -> int:
        return 0  # the server reads the prompt when the next message comes

    def request(self, prompt: Prompt, settings: SamplingParams) -> dict[str, Any]:
        system = [{"role": "system", "content": prompt.system}] if prompt.system else []
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt.messages]
        body: dict[str, Any] = {
            "model": self.model, "messages": system + messages, "stream": True,
            "stream_options": {"include_usage": True}}
        for s in SETTINGS:
            value, wire = getattr(settings, s.name), s.wire_name("openai")
            # Sent when set; the longest reply always (it is the app's, not the model's).
            if wire and value is not None and (value != s.default or s.name in self.given
                                               or s.name == "max_tokens"):
                body[wire] = value
        return body

    def reply(self, prompt: Prompt, settings: SamplingParams, emit: Emit,
              should_stop: ShouldStop) -> None:
        import httpx

        start, first, reply, finish, usage, pieces = time.perf_counter(), None, "", None, {}, 0
        try:
            with self.http.stream("POST", self.base + "/chat/completions",
                                  json=self.request(prompt, settings)) as r:
                if r.status_code != 200:
                    raise MlxMixtralError(_error_text(r.read(), r.status_code))
                for line in r.iter_lines():
                    if should_stop():
                        finish = "stopped"
                        break  # closing the stream stops the server's generation
                    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                        continue
                    data = json.loads(line[5:])
                    if "error" in data:
                        raise MlxMixtralError(_error_text(line[5:].encode(), 200))
                    usage = data.get("usage") or usage
                    for choice in data.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece:
                            first = first or time.perf_counter()
                            pieces += 1
                            reply += piece
                            emit(Chunk(piece, None))
                        finish = choice.get("finish_reason") or finish
        except httpx.HTTPError as e:
            raise MlxMixtralError(f"lost {self.base}: {e}") from None
        emit(self._stats(start, first, usage, pieces, reply, finish))

    @staticmethod
    def _stats(start: float, first: float | None, usage: dict, pieces: int, text: str,
               finish: str | None) -> Stats:
        end = time.perf_counter()
        ttft = (first or end) - start
        generated = usage.get("completion_tokens", pieces)
        return Stats(prompt_tokens=usage.get("prompt_tokens", 0),
                     prompt_tps=usage.get("prompt_tokens", 0) / max(ttft, 1e-9),
                     generation_tokens=generated,
                     generation_tps=(generated - 1) / max(end - (first or end), 1e-9)
                     if generated > 1 else 0.0,
                     ttft=ttft, peak_memory=0, finish_reason=finish, text=text,
                     context_used=usage.get("total_tokens", 0))
