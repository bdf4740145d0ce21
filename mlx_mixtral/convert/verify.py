"""Compare a converted model with its source on a fixed text: how much did conversion cost?"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..loading import load_model
from ..model.routing import RouterTrace

FIXED_TEXT = (
    "The mixture of experts routes every token to two of its eight feed-forward networks. "
    "Paris is the capital of France, and the Seine flows through it to the English Channel."
)
FIXED_LENGTH = 64


@dataclass
class Verification:
    tokens: int
    top1_agreement: float
    mean_kl: float
    router_agreement: float | None  # share of (token, layer) with the same expert set

    def __str__(self) -> str:
        line = (f"Verify on {self.tokens} tokens: top-1 agreement {self.top1_agreement:.1%}, "
                f"mean KL {self.mean_kl:.4g} nats")
        if self.router_agreement is not None:
            line += f", same experts chosen {self.router_agreement:.1%}"
        return line


def fixed_tokens(folder: Path, vocab_size: int) -> list[int]:
    """The fixed text through the model's tokenizer, or fixed ids if it has none."""
    from ..errors import TokenizerError
    from ..text.tokenizer import load_folder_tokenizer

    try:
        tokenizer = load_folder_tokenizer(folder)
        ids = tokenizer.encode(FIXED_TEXT, add_bos=tokenizer.add_bos)
        if ids and max(ids) < vocab_size:
            return ids[:FIXED_LENGTH]
    except TokenizerError:  # no usable tokenizer: fall back to fixed ids
        pass
    return np.random.RandomState(0).randint(0, vocab_size, FIXED_LENGTH).tolist()


def verify(source: str | Path, converted: str | Path) -> Verification:
    a, b = load_model(source), load_model(converted)
    ids = mx.array([fixed_tokens(Path(source), a.args.vocab_size)])
    trace_a, trace_b = RouterTrace(), RouterTrace()
    la = a(ids, router_trace=trace_a).astype(mx.float32)[0]
    lb = b(ids, router_trace=trace_b).astype(mx.float32)[0]
    log_pa = la - mx.logsumexp(la, axis=-1, keepdims=True)
    log_pb = lb - mx.logsumexp(lb, axis=-1, keepdims=True)
    pa = mx.exp(log_pa)
    kl = (pa * (log_pa - log_pb)).sum(-1).mean().item()
    top1 = (mx.argmax(la, -1) == mx.argmax(lb, -1)).astype(mx.float32).mean().item()
    router = None
    if trace_a:
        rows = [(np.sort(np.array(ra.indices), -1) == np.sort(np.array(rb.indices), -1)).all(-1)
                for ra, rb in zip(trace_a, trace_b, strict=True)]
        router = float(np.mean(np.concatenate([r.reshape(-1) for r in rows])))
    return Verification(ids.shape[1], top1, kl, router)
