"""What the KV-cache tests share: tiny models with 32-wide heads (a windowed Mistral, a
Mixtral and a draft Mistral of one vocabulary), prompts as token ids, and a greedy run."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from conftest import build_hf

from mlx_mixtral import load_model
from mlx_mixtral.generation import Stats, stream_generate
from mlx_mixtral.generation.sampling import SamplingParams

WINDOW = 16
GREEDY = SamplingParams(temperature=0, min_p=0, max_tokens=64)


def build_models(tmp_path_factory) -> dict:
    """Tiny models with head_dim 32 (so 32-wide quantization groups fit): a Mistral with a
    window, a Mixtral with full attention, and a Mistral draft sharing their vocabulary."""
    out = {}
    for name, kind, extra in (("mistral", "mistral", dict(sliding_window=WINDOW)),
                              ("mixtral", "mixtral", dict(num_local_experts=4,
                                                          num_experts_per_tok=2)),
                              ("draft", "mistral", dict(sliding_window=WINDOW, seed=9))):
        folder = tmp_path_factory.mktemp(name)
        build_hf(folder, kind, head_dim=32, **extra)
        out[name] = load_model(folder)
    return out


class Ids:
    """A tokenizer stand-in for prompts given as token ids (no text)."""

    eos_ids: set[int] = set()
    eos_id = -1

    def detokenizer(self):
        return self

    def add_token(self, token: int) -> str:
        return ""

    def finalize(self) -> str:
        return ""


def tokens(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.RandomState(seed).randint(3, 128, n)]


def run(model, prompt, **kw) -> Stats:
    return list(stream_generate(model, Ids(), prompt, **{"sampling": GREEDY, **kw}))[-1]


def filled(model, n: int, seed: int = 0) -> list:
    cache = model.make_cache()
    mx.eval(model(mx.array([tokens(n, seed)]), cache=cache))
    return cache


def decode_logits(model, cache, steps: int = 16) -> np.ndarray:
    out = []
    for t in tokens(steps, seed=5):
        out.append(np.array(model(mx.array([[t]]), cache=cache)))
    return np.concatenate(out, axis=1)
