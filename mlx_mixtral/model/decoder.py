"""Mistral (dense) and Mixtral (sparse MoE) decoder, in mlx-lm's model protocol.

`Model(inputs, cache=...)` returns logits `(batch, length, vocab)`; `model.layers` and
`model.make_cache()` let mlx-lm's generation tools drive it. Parameter names follow the
Hugging Face / mlx-lm layout so weights load without renaming (experts aside: the loaders
stack them).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu  # silu(gate) * up as one compiled kernel

from .attention import Attention
from .cache import FullKVCache, RollingKVCache
from .config import ModelArgs
from .limits import NO_LIMITS
from .masks import windowed_mask
from .moe import SparseMoE
from .packing import Packed
from .routing import RouterTrace
from .sharding import check_pipeline, check_world, run_pipeline, shard_layers, shard_tensors


class MLP(nn.Module):
    """The dense SwiGLU feed-forward of Mistral."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.is_moe = args.is_moe
        self.self_attn = Attention(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if self.is_moe:
            self.block_sparse_moe = SparseMoE(args.hidden_size, args.intermediate_size,
                                              args.num_local_experts, args.num_experts_per_tok)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)

    def __call__(self, x: mx.array, mask, cache=None, trace: list | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        r = self.post_attention_layernorm(h)
        r = self.block_sparse_moe(r, trace) if self.is_moe else self.mlp(r)
        return h + r


class DecoderStack(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.pipeline_group: mx.distributed.Group | None = None  # set by `pipeline`
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def pipeline(self, group: mx.distributed.Group) -> None:
        """Keep only this rank's run of layers (mlx-lm's pipeline protocol; sharding.py)."""
        check_pipeline(len(self.layers), group.size())
        shard_layers(self, group)


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.limits = NO_LIMITS  # the loader's, within a memory budget (limits.py)
        # The loader's: which of generation/sampling.py's MODEL_DEFAULTS suit it (None: none).
        self.defaults_name: str | None = None
        self.model_type = args.model_type
        self.model = DecoderStack(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def fuse(self) -> Model:
        """Fuse q/k/v and the experts' gate/up projections (fewer kernels per token). Done
        after loading; the weights on disk keep the unfused, mlx-lm compatible names."""
        for layer in self.layers:
            layer.self_attn.fuse()
            if layer.is_moe:
                layer.block_sparse_moe.switch_mlp.fuse()
        return self

    def shard(self, group: mx.distributed.Group | None = None) -> None:
        """Split every layer over the group's ranks (mlx-lm's tensor-parallel protocol;
        sharding.py)."""
        group = group or mx.distributed.init()
        check_world(self.args, group.size(), pipeline=False)
        shard_tensors(self, group)

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.model.layers

    @property
    def memory_plan(self) -> Any:
        """The memory budget's plan (loading/memory_plan.py), when the model was loaded within
        one; None otherwise. (A view of `limits`, named in the README's API.)"""
        return self.limits.memory_plan

    def _padding_mask(self, cache, length: int, padding: mx.array) -> mx.array:
        """(batch, 1, length, keys) mask: causal, windowed, and blind to left padding."""
        offset = 0 if cache is None else cache.offset
        q = mx.arange(offset, offset + length)[:, None]
        k = (mx.arange(length) if cache is None else cache.key_positions(length))[None]
        visible = k <= q
        if self.args.sliding_window is not None:
            visible = visible & (k > q - self.args.sliding_window)
        if getattr(cache, "start", 0):
            visible = visible & (k >= cache.start)
        real = k[None] >= padding[:, None, None]
        # A padding query sees itself, so that its (unused) row never softmaxes over nothing.
        return ((visible[None] & real) | (k == q)[None])[:, None]

    def make_cache(self, slack: int = 0) -> list[FullKVCache | RollingKVCache]:
        """One cache per layer: rolling at the sliding window, or full when there is none.
        `slack`: positions a rolling cache keeps beyond the window, so that trimming that many
        (rejected draft tokens) is exact."""
        window = self.args.sliding_window
        if window is None:
            return [FullKVCache() for _ in self.layers]
        return [RollingKVCache(window, slack) for _ in self.layers]

    def __call__(
        self,
        inputs: mx.array,
        cache: list | None = None,
        input_embeddings: mx.array | None = None,
        router_trace: RouterTrace | None = None,
        padding: mx.array | None = None,
    ) -> mx.array:
        """Logits for `inputs` (batch, length).

        `router_trace`: a `RouterTrace` that records the MoE routing of this pass.
        `padding`: (batch,) counts of left-padding tokens, for prompts of unequal length run
        together; those positions are hidden from every other token.
        `cache` may be a `Packed` (packing.py): several sequences' tokens in one row, each over
        its own cache; the logits are then those of each sequence's last token (1, sequences,
        vocab)."""
        h = input_embeddings if input_embeddings is not None else self.model.embed_tokens(inputs)
        length = h.shape[1]
        window = self.args.sliding_window
        packed = cache if isinstance(cache, Packed) else None
        if packed is not None:
            cache, mask = packed.layers(window), None
        elif cache is None:
            cache = [None] * len(self.layers)
            mask = windowed_mask(0, length, 0, length, window)
        else:
            mask = cache[0].make_mask(length, window_size=window)
        if padding is not None:
            mask = self._padding_mask(cache[0], length, padding)
        if self.model.pipeline_group is not None:
            h = run_pipeline(self.layers, h, mask, cache, router_trace, self.model.pipeline_group)
        else:
            for layer, c in zip(self.layers, cache, strict=True):
                h = layer(h, mask, c, router_trace)
        if packed is not None:  # only the rows that are sampled reach the (wide) head
            h = h[:, mx.array(packed.ends)]
        h = self.model.norm(h)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)
