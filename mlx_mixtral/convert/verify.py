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


# The usual cost of conversion on natural text, by bits per weight (None: float): the
# highest mean KL (nats) and the lowest top-1 agreement. Beyond them, something went wrong.
EXPECTED = {None: (0.001, 0.99), 8: (0.01, 0.90), 6: (0.03, 0.85), 5: (0.06, 0.80),
            4: (0.15, 0.75), 3: (0.5, 0.60), 2: (2.0, 0.40)}


@dataclass
class Verification:
    tokens: int
    top1_agreement: float
    mean_kl: float
    router_agreement: float | None  # share of (token, layer) with the same expert set
    bits: int | None = None  # of the converted weights (None: not quantized)

    def expected(self) -> bool:
        max_kl, min_top1 = EXPECTED.get(self.bits, EXPECTED[2])
        return self.mean_kl <= max_kl and self.top1_agreement >= min_top1

    def verdict(self) -> str:
        max_kl, min_top1 = EXPECTED.get(self.bits, EXPECTED[2])
        what = f"{self.bits}-bit" if self.bits else "a float conversion"
        usual = f"mean KL <= {max_kl:g} and top-1 >= {min_top1:.0%} are usual for {what}"
        if self.expected():
            return f"Verdict: as expected ({usual})."
        return (f"Verdict: worse than expected ({usual}); check the source folder, or convert "
                "with more bits (--q-bits)")

    def __str__(self) -> str:
        line = (f"Verify on {self.tokens} tokens: top-1 agreement {self.top1_agreement:.1%}, "
                f"mean KL {self.mean_kl:.4g} nats")
        if self.router_agreement is not None:
            line += f", same experts chosen {self.router_agreement:.1%}"
        return f"{line}\n{self.verdict()}"


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
    return Verification(ids.shape[1], top1, kl, router, bits_of(Path(converted)))


def bits_of(folder: Path) -> int | None:
    """The converted folder's main bits per weight (the experts' where they differ)."""
    from ..loading.source import read_config
    from .plan import is_ffn

    q = read_config(folder).get("quantization")
    if not isinstance(q, dict):
        return None
    ffn = [v.get("bits") for k, v in q.items() if isinstance(v, dict) and is_ffn(k)]
    return min(ffn) if ffn else q.get("bits")
