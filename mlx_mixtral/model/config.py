"""Model configuration: one `ModelArgs` for Mistral (dense) and Mixtral (sparse MoE).

Built from a Hugging Face config dict (the loaders read the files); unknown keys are ignored,
missing required keys are reported by name. Named presets describe the released models, for
`info` and for sizing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import ConfigError

SUPPORTED_MODEL_TYPES = ("mistral", "mixtral")
REQUIRED_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)


def _check_positive_ints(args: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(args, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.001

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}; expected one of "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        _check_positive_ints(self, _INT_FIELDS)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_positive_ints(self, ("num_key_value_heads", "head_dim"))
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(
                f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.sliding_window is not None:
            _check_positive_ints(self, ("sliding_window",))
        if self.is_moe:
            _check_positive_ints(self, ("num_local_experts", "num_experts_per_tok"))
            if self.num_experts_per_tok > self.num_local_experts:
                raise ConfigError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                    f"num_local_experts ({self.num_local_experts})"
                )

    @property
    def is_moe(self) -> bool:
        return self.model_type == "mixtral"

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        """Build from a Hugging Face config dict (transformers 4 or 5 layout)."""
        if not isinstance(config, dict):
            raise ConfigError("config must be a JSON object")
        missing = [key for key in REQUIRED_KEYS if key not in config]
        if missing:
            raise ConfigError(f"config is missing required key(s): {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known}
        # transformers 5 moves rope_theta into `rope_parameters`.
        rope = config.get("rope_parameters") or {}
        if "rope_theta" not in values and isinstance(rope, dict) and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        if values.get("head_dim") is None:
            values.pop("head_dim", None)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ---- sizes -----------------------------------------------------------------------------

    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per token) parameter counts, embeddings and head included."""
        h, hd = self.hidden_size, self.head_dim
        attention = h * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        mlp = 3 * h * self.intermediate_size
        norms = 2 * h
        if self.is_moe:
            experts_total = self.num_local_experts * mlp
            experts_active = self.num_experts_per_tok * mlp
            router = h * self.num_local_experts
        else:
            experts_total = experts_active = mlp
            router = 0
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else embed
        shared = embed + head + h + self.num_hidden_layers * (attention + norms + router)
        total = shared + self.num_hidden_layers * experts_total
        active = shared + self.num_hidden_layers * experts_active
        return total, active

    def kv_bytes_per_token(self, itemsize: int = 2) -> int:
        """Bytes the KV cache grows by per token: keys and values of every layer's KV heads,
        `itemsize` bytes a value (2: float16)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * itemsize


_MISTRAL_7B = dict(model_type="mistral", vocab_size=32000, hidden_size=4096,
                   intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, max_position_embeddings=32768)

PRESETS: dict[str, dict[str, Any]] = {
    "mistral-7b-v0.1": {**_MISTRAL_7B, "rope_theta": 1e4, "sliding_window": 4096},
    "mistral-7b-v0.2": {**_MISTRAL_7B, "rope_theta": 1e6, "sliding_window": None},
    "mistral-7b-v0.3": {**_MISTRAL_7B, "rope_theta": 1e6, "vocab_size": 32768},
    "mixtral-8x7b": {**_MISTRAL_7B, "model_type": "mixtral", "rope_theta": 1e6},
    "mixtral-8x22b": dict(model_type="mixtral", vocab_size=32768, hidden_size=6144,
                          intermediate_size=16384, num_hidden_layers=56, num_attention_heads=48,
                          num_key_value_heads=8, max_position_embeddings=65536, rope_theta=1e6),
}


def preset(name: str) -> ModelArgs:
    """The `ModelArgs` of a released model, by name (see `PRESETS`)."""
    try:
        return ModelArgs.from_dict(PRESETS[name])
    except KeyError:
        raise ConfigError(
            f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}"
        ) from None
