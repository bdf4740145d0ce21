"""Setting up drafted decoding and quantized KV caches from command-line flags."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..errors import GenerationError
from ..generation.kv import KVSettings

PROBE = "The quick brown fox jumps over the lazy dog. 1234 [INST] Ünïcödé 日本"


def add_kv_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-bits", type=int, default=None,
                   help="quantize the KV cache to 4 or 8 bits (default: the model's dtype)")
    p.add_argument("--kv-group-size", type=int, default=64,
                   help="values per quantization group of the KV cache")
    p.add_argument("--quantized-kv-start", type=int, default=0,
                   help="quantize the KV cache once it holds this many tokens")


def add_draft_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft-model", default=None,
                   help="a small model with the same vocabulary that drafts tokens for the "
                   "model to check (drafted decoding)")
    p.add_argument("--num-draft-tokens", type=int, default=3,
                   help="tokens the draft model proposes per step")
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="K",
                   help="draft up to K tokens from n-gram matches in the prompt and history, "
                   "no second model (0 = off)")


def kv_from(args: argparse.Namespace) -> KVSettings:
    return KVSettings(args.kv_bits, args.kv_group_size, args.quantized_kv_start)


def drafting_from(args: argparse.Namespace, force: bool = False,
                  dtype: str | None = None) -> Callable[[Any, Any], Any] | None:
    """A function (model, tokenizer) -> Drafter for the flags, or None; the draft model is
    loaded (and its vocabulary checked against the model's) when it is called. (Drafting's
    modules are imported only when asked for: they take a second.)"""
    if args.draft_model and args.prompt_lookup:
        raise GenerationError("--draft-model and --prompt-lookup exclude each other")
    if args.prompt_lookup:
        from ..generation.speculative import LookupDrafter

        k = args.prompt_lookup
        LookupDrafter(k)  # validates
        return lambda model, tokenizer: LookupDrafter(k)
    if not args.draft_model:
        return None
    if args.num_draft_tokens < 1:
        raise GenerationError(f"--num-draft-tokens must be at least 1, got "
                              f"{args.num_draft_tokens}")
    from ..generation.speculative import ModelDrafter
    from ..loading import load

    name, k = args.draft_model, args.num_draft_tokens

    def make(model: Any, tokenizer: Any) -> ModelDrafter:
        draft, draft_tokenizer = load(name, force=force, dtype=dtype)
        check_same_vocabulary(name, draft, draft_tokenizer, model, tokenizer)
        return ModelDrafter(draft, k)

    return make


def draft_needs_from(args: argparse.Namespace, dtype: str | None = None):
    """What the drafting flags add to the model's memory plan (`DraftNeeds`), or None: the
    draft model is described (a missing one is one line) before anything loads."""
    if args.prompt_lookup:
        from ..loading.memory_plan import DraftNeeds

        return DraftNeeds(args.prompt_lookup)
    if not args.draft_model:
        return None
    from ..loading import draft_needs

    return draft_needs(args.num_draft_tokens, args.draft_model, dtype)


def check_same_vocabulary(name: str, draft: Any, draft_tokenizer: Any, model: Any,
                          tokenizer: Any) -> None:
    theirs, ours = draft.args.vocab_size, model.args.vocab_size
    same = theirs == ours
    if same and tokenizer is not None and draft_tokenizer is not None:
        same = draft_tokenizer.encode(PROBE) == tokenizer.encode(PROBE)
    if not same:
        raise GenerationError(f"--draft-model {name}: its vocabulary ({theirs} tokens) is not "
                              f"the model's ({ours} tokens); use a draft model of the same "
                              "family")
