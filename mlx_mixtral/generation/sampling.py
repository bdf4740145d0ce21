"""Sampling settings, validated once, turned into mlx-lm's samplers and logits processors.

(mlx-lm is imported only when a sampler is made: the CLI reads the defaults for its --help.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from ..errors import SamplingError

if TYPE_CHECKING:
    import mlx.core as mx


@dataclass(frozen=True)
class SamplingParams:
    """What a reply is sampled with. The defaults suit chat with an instruct model.

    temperature 0.7     0 means greedy (always the most likely token)
    top_p 0.95          nucleus: keep the smallest set of tokens holding this probability (1 = off)
    top_k 0             keep only the k most likely tokens (0 = off)
    min_p 0.05          drop tokens below this share of the top token's probability (0 = off)
    repetition_penalty 1.0   >1 discourages tokens seen in the last `repetition_context` (1 = off)
    repetition_context 64
    presence_penalty 0.0     OpenAI's: subtracted from tokens seen in the last `repetition_context`
    frequency_penalty 0.0    OpenAI's: subtracted once per time each such token was seen
    max_tokens 512      the longest reply
    seed None           a number makes sampling reproducible
    """

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    repetition_context: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = 512
    seed: int | None = None

    def __post_init__(self) -> None:
        def number(name: str, lo: float, hi: float = math.inf) -> None:
            value = getattr(self, name)
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not lo <= value <= hi or math.isnan(value)):
                bound = f"between {lo} and {hi}" if hi != math.inf else f"at least {lo}"
                raise SamplingError(f"{name} must be a number {bound}, got {value!r}")

        def integer(name: str, lo: int) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise SamplingError(f"{name} must be an integer >= {lo}, got {value!r}")

        number("temperature", 0.0, 100.0)
        number("top_p", 0.0, 1.0)
        number("min_p", 0.0, 1.0)
        number("repetition_penalty", 0.0, 100.0)
        number("presence_penalty", -2.0, 2.0)
        number("frequency_penalty", -2.0, 2.0)
        if self.repetition_penalty == 0:
            raise SamplingError("repetition_penalty must be above 0 (1 turns it off)")
        integer("top_k", 0)
        integer("repetition_context", 1)
        integer("max_tokens", 1)
        if self.seed is not None:
            integer("seed", 0)

    @classmethod
    def from_kwargs(cls, base: SamplingParams | None = None, **kwargs: Any) -> SamplingParams:
        """`base` (or the defaults) with the given settings changed (None: left as it is);
        unknown names are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise SamplingError(f"unknown sampling setting(s): {', '.join(unknown)}")
        return replace(base or cls(), **{k: v for k, v in kwargs.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sampler(self, vocab_size: int,
                keys: Keys | None = None) -> Callable[[mx.array], mx.array]:
        """mlx-lm's sampler protocol (log-probabilities in, tokens out). With seeded `keys`
        each draw takes the next key, so no other caller's draws (nor ours theirs) move it;
        without, mlx-lm's own sampler, which draws from MLX's global generator."""
        from mlx_lm.sample_utils import make_sampler

        # top_p = 1 and min_p = 0 are "off"; mlx-lm spells off as 0 for top_p. A top_k that
        # keeps the whole vocabulary is off too (mlx-lm refuses it mid-generation).
        top_k = self.top_k if self.top_k < vocab_size else 0
        if keys is None or keys.seed is None or self.temperature == 0:
            return make_sampler(self.temperature, top_p=0.0 if self.top_p >= 1 else self.top_p,
                                min_p=self.min_p, top_k=top_k)
        import mlx.core as mx

        def sample(logprobs: mx.array) -> mx.array:
            return mx.random.categorical(self._filtered(logprobs) * (1 / self.temperature),
                                         key=keys.next())

        return sample

    def _filtered(self, x: mx.array) -> mx.array:
        """Rows of log-probabilities with top_p, min_p and top_k applied, in mlx-lm's order."""
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        if 0 < self.top_p < 1:
            x = apply_top_p(x, self.top_p)
        if self.min_p:
            x = apply_min_p(x, self.min_p)
        if 0 < self.top_k < x.shape[-1]:
            x = apply_top_k(x, self.top_k)
        return x

    def distribution(self, logprobs: mx.array) -> mx.array:
        """The probabilities this sampler draws the next token from, given one row of
        log-probabilities (the same filters, in the same order, as `sampler`)."""
        import mlx.core as mx

        if self.temperature == 0:
            return mx.softmax(logprobs, axis=-1)
        return mx.softmax(self._filtered(logprobs[None])[0] * (1 / self.temperature), axis=-1)

    def logits_processors(self) -> list:
        def on(value: float, off: float) -> float | None:
            return None if value == off else value

        wanted = dict(repetition_penalty=on(self.repetition_penalty, 1.0),
                      presence_penalty=on(self.presence_penalty, 0.0),
                      frequency_penalty=on(self.frequency_penalty, 0.0))
        if all(v is None for v in wanted.values()):
            return []
        from mlx_lm.sample_utils import make_logits_processors

        n = self.repetition_context
        return make_logits_processors(**wanted, repetition_context_size=n,
                                      presence_context_size=n, frequency_context_size=n)


class Keys:
    """The random keys of one reply, split one after another from its seed: the reply is
    reproducible, however other replies or callers use MLX's global generator in between, and
    it leaves that generator as it found it. Without a seed, `next` is None: draws then come
    from the global generator, as in mlx-lm."""

    def __init__(self, seed: int | None) -> None:
        import mlx.core as mx

        self.seed = seed
        self._key = None if seed is None else mx.random.key(seed)

    def next(self) -> mx.array | None:
        import mlx.core as mx

        if self._key is None:
            return None
        self._key, key = mx.random.split(self._key)
        return key
