"""Sampling settings, validated once, turned into mlx-lm's samplers and logits processors.

(mlx-lm is imported only when a sampler is made: the CLI reads the defaults for its help.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace
from typing import TYPE_CHECKING, Any

from ..demo import DEMO_NAME
from ..errors import SamplingError

if TYPE_CHECKING:
    import mlx.core as mx


@dataclass(frozen=True)
class Setting:
    """One sampling setting, declared once: `SamplingParams`' field and its check, the CLI
    flag, the server's request fields, the app's settings screen and the error messages are all
    read from `SETTINGS`."""

    name: str  # the field, and the parameter's name in the Python API and OpenAI's API
    kind: type  # int or float
    default: float | int | None
    lo: float
    hi: float = math.inf
    help: str = ""  # for --help
    flags: tuple[str, ...] = ()  # the CLI's spellings (default: the name, dashed)
    wire: tuple[tuple[str, str | None], ...] = ()  # per API, another name (None: not offered)
    api_hi: float | None = None  # the APIs' upper bound, where theirs is narrower (OpenAI's)
    extension: bool = True  # not in OpenAI's API (sent to a server only when changed)
    label: str | None = None  # on the app's settings screen (None: not shown there)
    short: str = ""  # in the app's status line when changed

    @property
    def cli_flags(self) -> tuple[str, ...]:
        return tuple("--" + f.replace("_", "-") for f in self.flags or (self.name,))

    def wire_name(self, api: str) -> str | None:
        """The setting's field in a request to `api` ("openai" or "ollama")."""
        return dict(self.wire).get(api, self.name)

    def check(self, value: Any) -> None:
        """SamplingError naming the setting unless `value` is in range (None: only seed)."""
        if value is None and self.default is None:
            return
        ok = isinstance(value, (int, float) if self.kind is float else int) and \
            not isinstance(value, bool) and not (isinstance(value, float) and math.isnan(value))
        ok = ok and self.lo <= value <= self.hi
        if ok:
            return
        raise SamplingError(f"{self.name} must be {self.range_text()}, got {value!r}",
                            params=(self.name,))

    def range_text(self) -> str:
        """E.g. "a number between 0.0 and 1.0", "an integer >= 1"."""
        lo, hi = self.lo, self.hi
        if self.kind is int:
            return f"an integer >= {lo}" if hi == math.inf else \
                f"an integer between {lo} and {hi}"
        return f"a number at least {lo}" if hi == math.inf else f"a number between {lo} and {hi}"


# mlx-lm's keywords of generate/stream_generate that are spelled otherwise here (or not taken).
MLX_LM_NAMES = {
    "temp": "use temperature=",
    "prompt_cache": "use cache=",
    "sampler": "give the settings, or sampling=SamplingParams(...)",
    "logits_processors": "use processors=",
    "max_kv_size": "not taken: a model with a window keeps a rolling cache by itself",
    "verbose": "not taken: the last item, Stats, holds the figures to print",
}


# The defaults suit chat with an instruct model.
SETTINGS: tuple[Setting, ...] = (
    Setting("temperature", float, 0.7, 0.0, 100.0, "sampling temperature; 0 is greedy",
            flags=("temp", "temperature"), api_hi=2.0, extension=False,
            label="Temperature (0 = greedy)", short="temp"),
    Setting("top_p", float, 0.95, 0.0, 1.0,
            "nucleus sampling: keep the fewest tokens holding this probability (1 = off)",
            extension=False, label="Top-p (1 = off)", short="top-p"),
    Setting("top_k", int, 0, 0, help="keep the k likeliest (0 = off)", label="Top-k (0 = off)",
            short="top-k"),
    Setting("min_p", float, 0.05, 0.0, 1.0,
            "drop tokens below this share of the top one (0 = off)", label="Min-p (0 = off)",
            short="min-p"),
    Setting("max_tokens", int, 512, 1, help="longest reply", wire=(("ollama", "num_predict"),),
            extension=False, label="Max tokens", short="max"),
    # (a penalty near 0 would divide the logits into infinities: NaN, no token)
    Setting("repetition_penalty", float, 1.0, 0.01, 100.0,
            "> 1 discourages the tokens of the last repetition_context (1 = off)",
            wire=(("ollama", "repeat_penalty"),),
            label="Repetition penalty (1 = off)", short="penalty"),
    Setting("repetition_context", int, 64, 1, help="how many recent tokens the penalties look at",
            wire=(("openai", None), ("ollama", "repeat_last_n"))),
    Setting("presence_penalty", float, 0.0, -2.0, 2.0,
            "OpenAI's: subtracted from the tokens of the last repetition_context (0 = off)",
            extension=False),
    Setting("frequency_penalty", float, 0.0, -2.0, 2.0,
            "OpenAI's: subtracted once per time such a token was seen (0 = off)",
            extension=False),
    Setting("seed", int, None, 0, help="make sampling reproducible", api_hi=2**63 - 1,
            extension=False, label="Seed (empty = random)", short="seed"),
)


# Sampling defaults that suit a model better than SETTINGS' own, by the name the loader gives
# it (`model.defaults_name`): the one place they are decided. They apply where the user set
# nothing (no flag, no request field, nothing changed in the app). The demo, SmolLM2-135M,
# loops or rambles at temperature 0.7 (the issue 27 trial: 4 of 6 seeds gibberish); at these,
# measured over 20 seeds, all 20 name Paris within 40 tokens (tests/test_model_defaults.py).
MODEL_DEFAULTS: dict[str, dict[str, float]] = {
    DEMO_NAME: {"temperature": 0.2, "repetition_penalty": 1.1},
}


@dataclass(frozen=True)
class ModelDefaults:
    """A loaded model's own sampling defaults (none for most models)."""

    name: str = ""
    values: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """"demo defaults: temp 0.2, penalty 1.1" ("" when there are none)."""
        if not self.values:
            return ""
        return f"{self.name} defaults: " + ", ".join(
            f"{s.short or s.name} {self.values[s.name]}" for s in SETTINGS if s.name in self.values)

    def apply(self, settings: SamplingParams, given: Iterable[str] = ()) -> SamplingParams:
        """`settings` with this model's defaults in place of every setting not `given` by the
        user."""
        given = set(given)
        return replace(settings, **{k: v for k, v in self.values.items() if k not in given})


def model_defaults(model: Any) -> ModelDefaults:
    """The sampling defaults of a loaded model (any mlx-lm model works too: none)."""
    name = getattr(model, "defaults_name", None)
    return ModelDefaults(name, MODEL_DEFAULTS[name]) if name in MODEL_DEFAULTS else \
        ModelDefaults()


def requested(api: str, body: Any) -> dict[str, Any]:
    """The settings a request to `api` carries, by our names (None: not given)."""
    return {s.name: getattr(body, wire, None) for s in SETTINGS if (wire := s.wire_name(api))}


def _params_class() -> type:
    """`SamplingParams`' fields, from `SETTINGS`."""
    return make_dataclass("_SamplingFields", [
        (s.name, s.kind if s.default is not None else (s.kind | None), s.default)
        for s in SETTINGS], frozen=True)


BAN = -100.0  # OpenAI's logit_bias bound, which bans the token


@dataclass(frozen=True)
class SamplingParams(_params_class()):
    """What a reply is sampled with: one field per entry of `SETTINGS` (see there), and
    OpenAI's `logit_bias` (token id, bias) pairs: added to the logits, -100 bans the token."""

    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        for s in SETTINGS:
            s.check(getattr(self, s.name))
        bias = tuple((int(t), float(b)) for t, b in self.logit_bias)  # (JSON gives lists)
        if any(not -100 <= b <= 100 for _, b in bias) or any(t < 0 for t, _ in bias):
            raise SamplingError("logit_bias maps token ids to numbers between -100 and 100",
                                params=("logit_bias",))
        object.__setattr__(self, "logit_bias", bias)

    @classmethod
    def from_kwargs(cls, base: SamplingParams | None = None, **kwargs: Any) -> SamplingParams:
        """`base` (or the defaults) with the given settings changed (None: left as it is);
        unknown names are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            named = [name + (f" ({MLX_LM_NAMES[name]})" if name in MLX_LM_NAMES else "")
                     for name in unknown]
            raise SamplingError(f"unknown setting(s): {', '.join(named)}")
        return replace(base or cls(), **{k: v for k, v in kwargs.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.logit_bias:  # (the app's saved settings have none)
            del out["logit_bias"]
        return out

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

    def logits_processors(self, history: Sequence[int] = ()) -> list:
        """mlx-lm's processors for the penalties. They look at the last repetition_context
        tokens, counting `history` (the tokens a reused cache holds before this prompt), so a
        cached prefix gives the reply a prompt read afresh would get."""
        def on(value: float, off: float) -> float | None:
            return None if value == off else value

        wanted = dict(repetition_penalty=on(self.repetition_penalty, 1.0),
                      presence_penalty=on(self.presence_penalty, 0.0),
                      frequency_penalty=on(self.frequency_penalty, 0.0))
        biased = [self._biased] if self.logit_bias else []
        if all(v is None for v in wanted.values()):
            return biased
        from mlx_lm.sample_utils import make_logits_processors

        n = self.repetition_context
        processors = make_logits_processors(**wanted, repetition_context_size=n,
                                            presence_context_size=n, frequency_context_size=n)
        if not history:
            return biased + processors
        import mlx.core as mx

        past = mx.array(list(history[-n:]), dtype=mx.int32)

        def after(processor: Callable) -> Callable:
            return lambda tokens, logits: processor(
                past if tokens is None else mx.concatenate([past, tokens.astype(mx.int32)]),
                logits)

        return biased + [after(p) for p in processors]

    def _biased(self, tokens: mx.array, logits: mx.array) -> mx.array:
        """mlx-lm's logits processor for `logit_bias` (-100: -inf, as OpenAI bans)."""
        import mlx.core as mx

        size = logits.shape[-1]
        ids = [t for t, _ in self.logit_bias if t < size]
        bias = [-mx.inf if b <= BAN else b for t, b in self.logit_bias if t < size]
        if not ids:
            return logits
        row = mx.zeros((size,), dtype=logits.dtype).at[mx.array(ids)].add(
            mx.array(bias, dtype=logits.dtype))
        return logits + row


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
