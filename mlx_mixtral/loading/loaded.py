"""What a loaded model is, said for people: the chat app's model line and the Ollama API's
/api/tags both read it here."""

from __future__ import annotations

from typing import Any


def quantization_of(model: Any) -> str:
    """"4-bit", "3/4-bit" (mixed), or "float": the bit widths of its quantized layers."""
    bits = sorted({m.bits for _, m in model.named_modules() if hasattr(m, "bits")})
    return "float" if not bits else "/".join(str(b) for b in bits) + "-bit"
