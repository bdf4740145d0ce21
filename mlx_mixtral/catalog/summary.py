"""A model described for people and for model lists, from its file headers alone (no tensor is
read): what `info`, `list`, the app's model picker and Ollama's /api/tags and /api/show say
about it, so that they agree; and a loaded model's quantization, for the app's model line."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..units import human

if TYPE_CHECKING:
    from ..loading.source import ModelSource
    from ..model.config import ModelArgs

FIT_WORDS = ("fits", "pages", "too big")


def fit(memory_bytes: int, page_bytes: int | None, available: int) -> str:
    """In `available` bytes (0: unknown, so it fits): "fits", "pages" (runs only with its
    experts read from disk as chosen) or "too big"."""
    if not available or memory_bytes <= available:
        return "fits"
    return "pages" if page_bytes is not None and page_bytes <= available else "too big"


@dataclass(frozen=True)
class ModelSummary:
    path: Path
    family: str  # "mixtral", "mistral", or the architecture a GGUF file or config names
    format: str  # "safetensors" or "gguf"
    parameters: int
    active_parameters: int  # per token (a mixture of experts runs top_k of them)
    stored_as: str  # "4-bit (group 64), MLX", "GGUF Q4_K (mostly)", "bfloat16"
    disk_bytes: int
    memory_bytes: int  # once loaded
    page_bytes: int | None  # the least memory it runs in, its experts paged (None: no)
    layers: int
    experts: int  # per layer (0: a dense model)
    top_k: int
    context: int
    window: int | None

    @property
    def parameter_size(self) -> str:
        return human(self.parameters, "B")

    def fit(self, available: int) -> str:
        return fit(self.memory_bytes, self.page_bytes, available)


def quantization_of(model: Any) -> str:
    """A loaded model's quantization, for the app's model line: "4-bit", "3/4-bit" (mixed), or
    "float" (the bit widths of its quantized layers; a file's own is `stored_as`)."""
    bits = sorted({m.bits for _, m in model.named_modules() if hasattr(m, "bits")})
    return "float" if not bits else "/".join(str(b) for b in bits) + "-bit"


def stored_as(source: ModelSource) -> str:
    """How the file stores its weights: "4-bit (group 64), MLX", "GGUF Q4_1 (mostly)",
    "bfloat16"."""
    counts = Counter(t.dtype for t in source.tensors if not t.name.endswith((".scales",
                                                                             ".biases")))
    if source.format == "gguf":
        quantized = Counter({k: v for k, v in counts.items() if k not in ("F32", "F16", "BF16")})
        kind = (quantized or counts).most_common(1)[0][0]
        return f"GGUF {kind}" + (" (mostly)" if len(counts) > 1 else "")
    q = source.quantization
    if q:
        bits = {q.get("bits")} | {v.get("bits") for v in q.values() if isinstance(v, dict)}
        bits.discard(None)
        label = "/".join(str(b) for b in sorted(bits)) + "-bit"
        return f"{label} (group {q.get('group_size', 64)}), MLX"
    return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(
        counts.most_common(1)[0][0], counts.most_common(1)[0][0]) if counts else "unknown"


def family(source: ModelSource) -> str:
    """The architecture the file names (a GGUF's general.architecture, a config's
    model_type), as Ollama reports it."""
    named = source.metadata.get("general.architecture") or source.config.get("model_type")
    return named or source.args.model_type


def disk_bytes(path: Path) -> int:
    """The file, or the files of the folder (weights, tokenizer, config)."""
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]
    return sum(f.stat().st_size for f in files)


def summarize_args(args: ModelArgs, path: Path = Path()) -> ModelSummary:
    """What the configuration alone says (a model built in memory has no file to read)."""
    total, active = args.parameter_counts()
    return ModelSummary(
        path=path, family=args.model_type, format="safetensors",
        parameters=total, active_parameters=active, stored_as="", disk_bytes=0, memory_bytes=0,
        page_bytes=None, layers=args.num_hidden_layers,
        experts=args.num_local_experts if args.is_moe else 0,
        top_k=args.num_experts_per_tok if args.is_moe else 0,
        context=args.max_position_embeddings, window=args.sliding_window)


def summarize(source: ModelSource) -> ModelSummary:
    from ..loading.memory import load_bytes
    from ..loading.memory_plan import minimum_budget, pageable

    return replace(summarize_args(source.args, source.path), family=family(source),
                   format=source.format, stored_as=stored_as(source),
                   disk_bytes=disk_bytes(source.path), memory_bytes=load_bytes(source),
                   page_bytes=minimum_budget(source) if pageable(source) else None)
