"""The Responses API's stored responses, for `previous_response_id` and `GET /v1/responses/{id}`:
in memory, within a byte budget, least recently used out first. A response larger than the
whole budget is not kept."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

RESPONSE_STORE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]  # as it was returned
    conversation: list[dict[str, Any]]  # chat messages up to and including its output
    nbytes: int


class ResponseStore:
    def __init__(self, budget: int = RESPONSE_STORE_BYTES) -> None:
        self.budget = budget
        self.nbytes = 0
        self._kept: OrderedDict[str, Stored] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        size = len(json.dumps([response, conversation], ensure_ascii=False).encode())
        if size > self.budget:
            return
        self.delete(response["id"])
        while self.nbytes + size > self.budget:
            _, old = self._kept.popitem(last=False)
            self.nbytes -= old.nbytes
        self._kept[response["id"]] = Stored(response, conversation, size)
        self.nbytes += size

    def get(self, response_id: str) -> Stored | None:
        stored = self._kept.get(response_id)
        if stored is not None:
            self._kept.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        stored = self._kept.pop(response_id, None)
        if stored is not None:
            self.nbytes -= stored.nbytes
        return stored is not None
