"""How a model runs within a memory budget (`--max-memory`): fully resident, or with its experts
paged in from disk into N slots per layer.

The budget holds, in MLX's own accounting (`mx.get_peak_memory`):
- every weight that is not an expert (attention, embeddings, head, norms, routers);
- `slots` experts per layer, fixed arrays reused in place;
- the KV cache for at least `context` tokens;
- working memory for a prefill chunk, which sets the chunk size (at most a tenth of the budget);
- a reserve, carved out first, for KV caches kept between requests (the server's prompt-cache
  pool): the model plans within what is left;
- the process's own memory outside MLX's counter (OVERHEAD): the runtime's first forward pass
  (~11 MB measured here: BLAS and the CPU backend's buffers) and the reader threads' staging
  buffers, so that the budget also holds as the operating system counts it (RSS).

MLX's buffer cache is limited to what the plan leaves beyond the weights (`cache_limit`): freed
buffers it keeps count in RSS though not in MLX's peak.
- with drafted decoding (`DraftNeeds`): a draft model's weights, its KV cache beside the model's
  (per token), its prefill's working memory, and the k positions of slack each verify pass
  writes before the rejected drafts are trimmed. Prompt lookup has no model: only the slack.

What is left bounds the context: a conversation may grow only as long as its KV cache and the
prefill's attention over it still fit (`context_limit`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import mlx.core as mx

from ..errors import MemoryLimitError
from ..model.precision import target_dtype
from ..units import parse_size, size
from . import memory
from .expert_files import STAGE_BYTES, is_expert_tensor
from .memory import check_fits, folder_tensor_bytes, gguf_tensor_bytes, load_bytes

if TYPE_CHECKING:
    from ..model.config import ModelArgs
    from .rank_loader import RankShare
    from .source import ModelSource

MIN_CONTEXT = 2048  # tokens the KV cache must hold at least
# Resident memory outside MLX's counter: the runtime's (measured above) and up to 8 reader
# threads' staging buffers (loading/expert_files.py's STAGE_BYTES each).
RUNTIME_OVERHEAD = 12 * 10**6
OVERHEAD = RUNTIME_OVERHEAD + 8 * STAGE_BYTES
PREFILL_STEPS = (512, 256, 128, 64, 32, 16)
WORKSPACE_SHARE = 0.1


@dataclass(frozen=True)
class DraftNeeds:
    """What drafted decoding adds to a budget (`draft_budget.draft_needs` builds it)."""

    tokens: int  # drafted per verify pass (k): the KV caches keep that many slack positions
    name: str | None = None  # the draft model as the user named it; None: prompt lookup
    weights: int = 0  # the draft model's, once loaded
    args: ModelArgs | None = None  # the draft model's shape: its KV cache and working memory
    kv_per_token: int = 0  # the draft model's KV cache


def workspace_bytes(args: ModelArgs, step: int, context: int) -> int:
    """Activations of one prefill chunk of `step` tokens (float32, generous): hidden states,
    attention scores over `context` keys, the experts' intermediates, one row of logits."""
    f = 4
    hidden = 8 * step * args.hidden_size * f
    attention = 3 * step * args.num_attention_heads * context * f
    pairs = step * (args.num_experts_per_tok if args.is_moe else 1)
    ffn = 2 * pairs * (2 * args.hidden_size + 3 * args.intermediate_size) * f
    return hidden + attention + ffn + 3 * args.vocab_size * f


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    resident: int  # every weight but the experts
    expert: int  # one expert of one layer, once loaded
    layers: int
    experts: int  # per layer (0: a dense model)
    top_k: int
    kv_per_token: int
    context: int  # the KV cache holds at least this many tokens
    prefill_step: int
    workspace: int
    slots: int  # experts in memory per layer
    context_limit: int  # the longest context the budget holds (<= the model's own)
    reserved: int = 0  # kept aside for KV caches kept between requests
    overhead: int = OVERHEAD  # the process's memory outside MLX's counter
    draft: DraftNeeds | None = None  # drafted decoding, counted inside the budget

    @property
    def drafting(self) -> int:
        """Fixed bytes drafting takes: the draft model's weights and the caches' slack for
        the drafted tokens (the draft's KV cache is in `kv_per_token`)."""
        if self.draft is None:
            return 0
        return self.draft.weights + self.kv_per_token * self.draft.tokens

    @property
    def paging(self) -> bool:
        return self.slots < self.experts

    @property
    def slot_bytes(self) -> int:
        return self.slots * self.layers * self.expert

    @property
    def fits(self) -> bool:
        """Enough for the minimal KV cache, and (paging) for top-k slots per layer."""
        return self.kv_room >= self.kv_per_token * self.context and (
            not self.paging or self.slots >= self.top_k)

    @property
    def kv_room(self) -> int:
        return (self.budget - self.reserved - self.overhead - self.resident - self.drafting
                - self.slot_bytes
                - self.workspace)

    @property
    def spare(self) -> int:
        """Room beyond the minimal KV cache (the longer contexts it allows)."""
        return max(self.kv_room - self.kv_per_token * self.context, 0)

    @property
    def cache_limit(self) -> int:
        """MLX's buffer cache may keep what the running requests' KV caches and working memory
        may use: freed there, it is reused there (weights and kept caches stay allocated)."""
        return max(self.kv_room + self.workspace, 0)

    def __str__(self) -> str:
        kv = (f"{size(self.kv_room)} left for the KV cache (a context of "
              f"{self.context_limit:,} tokens)")
        if self.reserved:
            kv += f", {size(self.reserved)} for caches kept between requests"
        if self.draft is not None and self.draft.name is not None:
            kv += f", {size(self.draft.weights)} for the draft model {self.draft.name}"
        if not self.paging:
            return (f"Memory plan for {size(self.budget)}: the whole model is resident "
                    f"({size(self.resident + self.slot_bytes)}), {kv}")
        return (f"Memory plan for {size(self.budget)}: {size(self.resident)} resident weights, "
                f"{self.slots} of {self.experts} experts per layer in memory "
                f"({size(self.slot_bytes)}; the others are read from disk when chosen), {kv}, "
                f"prefill in chunks of {self.prefill_step}")


def budget_bytes(max_memory: int | str) -> int:
    """A budget in bytes from an int or a size like "12GB"."""
    if isinstance(max_memory, int) and not isinstance(max_memory, bool):
        if max_memory <= 0:
            raise MemoryLimitError(f"max_memory must be more than 0, got {max_memory}",
                                   params=("max_memory",))
        return max_memory
    try:
        return parse_size(str(max_memory))
    except ValueError as e:
        raise MemoryLimitError(f"max_memory: {e}", params=("max_memory",)) from None


def model_sizes(source: ModelSource, dtype: str | mx.Dtype | None = None,
                share: RankShare | None = None) -> tuple[int, int]:
    """(every weight but the experts, the experts) once loaded (of one rank's `share` under
    mlx.launch); experts that cannot be paged (a GGUF's of a type that does not stream) count
    as the rest."""
    if not pageable(source):
        return load_bytes(source, dtype), 0
    if source.format == "gguf":
        from .gguf_weights import is_gguf_expert

        sizes, is_expert = gguf_tensor_bytes(source, target_dtype(dtype)), is_gguf_expert
    else:
        sizes, is_expert = folder_tensor_bytes(source, target_dtype(dtype)), is_expert_tensor
    if share is not None:
        sizes = [round(b * share.fractions[t.name])
                 for t, b in zip(source.tensors, sizes, strict=True)]
    experts = sum(b for t, b in zip(source.tensors, sizes, strict=True) if is_expert(t.name))
    return sum(sizes) - experts, experts


def plan_memory(source: ModelSource, budget: int, dtype: str | mx.Dtype | None = None,
                context: int | None = None, reserve: int = 0,
                shrink: bool = False, draft: DraftNeeds | None = None,
                share: RankShare | None = None) -> MemoryPlan:
    """The plan for `budget` bytes, `reserve` of them kept aside for caches kept between
    requests and `draft`'s share for drafted decoding; MemoryLimitError (with the minimum) if
    none runs. With `shrink` the reserve is at most half the room the model leaves beyond its
    minimal KV cache, instead of refused. `share`: the plan of one rank under mlx.launch, for
    what it holds."""
    resident, experts = model_sizes(source, dtype, share)
    args = source.args if share is None else share.args

    def planned(kept: int, drafting: DraftNeeds | None = draft) -> MemoryPlan:
        return plan_for(args, budget, resident, experts, target_dtype(dtype), context,
                        kept, drafting)

    if shrink:
        reserve = min(reserve, planned(0).spare // 2)
    plan = planned(reserve)
    if not plan.fits:
        need = minimum_budget(source, dtype, context, draft, share)
        if reserve and planned(0).fits:
            raise MemoryLimitError(
                f"prompt_cache_bytes={size(reserve)} does not fit in max_memory="
                f"{size(budget)}: {source.path.name} needs {size(need)} of it, so at most "
                f"{size(budget - need)} is left for kept caches; give less, or raise "
                "max_memory", params=("prompt_cache_bytes", "max_memory"))
        if draft is not None and draft.name is not None and planned(reserve, None).fits:
            raise MemoryLimitError(_no_room_to_draft(source, plan, draft, need),
                                   params=("max_memory", "draft_model", "prompt_lookup"))
        raise MemoryLimitError(_too_small(source, plan, need), params=("max_memory",))
    return plan


def automatic_plan(source: ModelSource, force: bool = False,
                   dtype: str | mx.Dtype | None = None,
                   context: int | None = None, reserve: int = 0,
                   shrink: bool = False, draft: DraftNeeds | None = None) -> MemoryPlan | None:
    """The plan for a model given no budget, as Ollama offloads what the GPU cannot hold: None
    when the model fits the available memory (or `force` loads it whole); a plan within the
    available memory when it does not but paging its experts runs there. Otherwise
    MemoryLimitError, naming paging's minimum where paging could run it elsewhere."""
    try:
        check_fits(source, force, dtype)
        return None
    except MemoryLimitError:
        if not pageable(source):
            raise
    have, least = memory.available_memory(), minimum_budget(source, dtype, context, draft)
    if least <= have:
        return plan_memory(source, have, dtype, context, reserve, shrink, draft)
    check_fits(source, dtype=dtype,  # the same refusal, with one more way out
               other_way=f"page its experts from disk (that needs at least {size(least)}), ")
    return None  # memory was freed meanwhile: it fits after all


def pageable(source: ModelSource) -> bool:
    """Whether the experts can be read from disk as needed: a Mixtral in safetensors, or in a
    GGUF whose experts are Q4_0, Q4_1 or Q8_0."""
    if not source.args.is_moe:
        return False
    if source.format == "gguf":
        from .gguf_experts import streamable

        return streamable(source)
    return source.format == "safetensors"


def minimum_budget(source: ModelSource, dtype: str | mx.Dtype | None = None,
                   context: int | None = None, draft: DraftNeeds | None = None,
                   share: RankShare | None = None) -> int:
    """The smallest budget with a plan that runs (found by bisection: the prefill chunk, and
    so the working memory, depends on the budget); of one rank's `share` under mlx.launch."""
    resident, experts = model_sizes(source, dtype, share)
    args = source.args if share is None else share.args
    target = target_dtype(dtype)
    low, high = 1, 2 * (resident + experts + (draft.weights if draft else 0)) + 2**30
    while high - low > max(high // 1000, 1):
        mid = (low + high) // 2
        if plan_for(args, mid, resident, experts, target, context, draft=draft).fits:
            high = mid
        else:
            low = mid
    return high


def plan_for(args: ModelArgs, budget: int, resident: int, experts_total: int,
             target: mx.Dtype | None, context: int | None = None,
             reserve: int = 0, draft: DraftNeeds | None = None) -> MemoryPlan:
    """The plan from sizes alone (`experts_total` 0: nothing can be paged); check `.fits`.
    The model plans within the budget less the `reserve`, `draft`'s share included."""
    if reserve:
        plan = plan_for(args, max(budget - reserve, 1), resident, experts_total, target, context,
                        draft=draft)
        return replace(plan, budget=budget, reserved=reserve)
    kv = args.kv_bytes_per_token((target or mx.float16).size)
    kv += draft.kv_per_token if draft else 0
    context = min(context or MIN_CONTEXT, args.sliding_window or args.max_position_embeddings,
                  args.max_position_embeddings)
    step = next((s for s in PREFILL_STEPS  # a share of what the model gets
                 if drafted_workspace(args, s, context, draft)
                 <= (budget - OVERHEAD) * WORKSPACE_SHARE),
                PREFILL_STEPS[-1])
    n_experts = args.num_local_experts if experts_total else 0
    expert = experts_total // max(args.num_hidden_layers * n_experts, 1)
    workspace = drafted_workspace(args, step, context, draft)
    drafting = (draft.weights + kv * draft.tokens) if draft else 0
    room = budget - OVERHEAD - resident - drafting - workspace - kv * context
    slots = int(min(n_experts, max(room // max(args.num_hidden_layers * expert, 1), 0)))
    limit = _context_limit(args, budget - OVERHEAD - resident - drafting
                           - slots * args.num_hidden_layers * expert, kv, step, draft)
    return MemoryPlan(budget, resident, expert, args.num_hidden_layers, n_experts,
                      args.num_experts_per_tok, kv, context, step, workspace, slots, limit,
                      draft=draft)


def drafted_workspace(args: ModelArgs, step: int, context: int,
                      draft: DraftNeeds | None = None) -> int:
    """The working memory of a prefill chunk of `step` tokens or, drafting, of a verify pass of
    k + 1 tokens if that is longer, and of the draft model's own prefill chunk."""
    if draft is None:
        return workspace_bytes(args, step, context)
    own = workspace_bytes(args, max(step, draft.tokens + 1), context)
    return own + (workspace_bytes(draft.args, step, context) if draft.args else 0)


def _context_limit(args: ModelArgs, room: int, kv: int, step: int,
                   draft: DraftNeeds | None = None) -> int:
    """The most tokens whose KV cache and prefill working memory fit in `room` bytes (the
    working memory grows with the keys a chunk attends to). A sliding window that fits bounds
    the cache by itself: then the model's whole context runs."""
    fixed = drafted_workspace(args, step, 0, draft)
    per_token = kv + drafted_workspace(args, step, 1, draft) - fixed
    tokens = max((room - fixed) // per_token, 0)
    window = args.sliding_window
    if window is not None and window + step <= tokens:
        return args.max_position_embeddings
    return int(min(tokens, args.max_position_embeddings))


def _no_room_to_draft(source: ModelSource, plan: MemoryPlan, draft: DraftNeeds,
                      need: int) -> str:
    """The model runs within the budget, but not with the draft model beside it."""
    return (f"max_memory={size(plan.budget)} cannot hold the draft model draft_model="
            f"{draft.name} as well: its {size(draft.weights)} of weights and its KV cache come "
            f"out of the budget, and with them {source.path.name} needs at least {size(need)}; "
            f"give max_memory={flag_size(need)} or more, or draft with prompt_lookup=4 (no "
            "second model)")


def _too_small(source: ModelSource, plan: MemoryPlan, need: int) -> str:
    what = (f"{plan.top_k} experts per layer, " if plan.experts else "")
    if not plan.experts and source.args.is_moe and source.format == "gguf":
        from .gguf_experts import not_streamable

        return str(not_streamable(source, size(plan.budget)))
    weights = "weights besides the experts" if source.args.is_moe else "weights"
    # A GGUF loads as its file is quantized; a safetensors folder can be converted.
    fewer_bits = ("or use a GGUF file quantized with fewer bits" if source.format == "gguf"
                  else "or convert with fewer bits")
    return (f"max_memory={size(plan.budget)} is too small for {source.path.name}: it needs "
            f"at least {size(need)} ({size(plan.resident)} of {weights}, "
            f"{what}a {plan.context}-token KV cache and working memory); give "
            f"max_memory={flag_size(need)} or more, {fewer_bits}")


def flag_size(n: int) -> str:
    """Bytes as a --max-memory value, rounded up (so that it is enough)."""
    if n >= 1e9:
        return f"{math.ceil(n / 1e7) / 100:.2f}GB"
    return f"{math.ceil(n / 1e5) / 10:.1f}MB"
