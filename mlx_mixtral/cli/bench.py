"""`mlx-mixtral bench`: speed and memory, measured side by side with mlx-lm on the same weights.

Both engines run the same harness — mlx-lm's `generate_step` (chunked prefill, pipelined greedy
decoding) over the same prompt tokens and the same MLX folder — alternating run by run, and every
figure is the median over the runs. Ratios are ours over mlx-lm's for rates (higher is better)
and mlx-lm's over ours for times and memory (higher is better too).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from ..generation.kv import KVSettings
from ..model.config import ModelArgs
from ..model.limits import DEFAULT_PREFILL_STEP
from ..units import size
from ..user_files import cache_dir

if TYPE_CHECKING:
    from ..generation.stats import Stats
    from ..loading.load_plan import LoadPlan

PRESETS: dict[str, dict[str, Any]] = {
    "mixtral-tiny": dict(model_type="mixtral", vocab_size=32000, hidden_size=1024,
                         intermediate_size=3584, num_hidden_layers=8, num_attention_heads=16,
                         num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=32768, rope_theta=1e6),
    "mistral-tiny": dict(model_type="mistral", vocab_size=32000, hidden_size=512,
                         intermediate_size=1792, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, sliding_window=256,
                         max_position_embeddings=32768, rope_theta=1e4),
    # Layers that change the residual stream as little as a trained model's (see below), for
    # measuring the expert cache and its guess; small, so that tests build it in seconds.
    "mixtral-realistic": dict(model_type="mixtral", vocab_size=1024, hidden_size=256,
                              intermediate_size=2048, num_hidden_layers=8,
                              num_attention_heads=4, num_key_value_heads=1,
                              num_local_experts=8, num_experts_per_tok=2,
                              max_position_embeddings=4096, rope_theta=1e4),
}
PRESET_BITS, PRESET_GROUP, PRESET_SEED = 4, 64, 0
# SmolLM2-135M-Instruct (the demo GGUF), over the 37-token English prompt in
# tests/test_realistic_model.py: the cosine between consecutive layers' inputs averages 0.92
# over its 30 layers (the first layer rewrites the embedding, cosine 0.0; the others 0.82-0.98,
# median 0.97); measured 2026-12-02 with model/residual_stream.py. Random weights give 0.69 on
# the `mixtral-realistic` shape; its residual branches' output projections scaled by 0.055 give
# the trained model's 0.92. Its routers stay random: over a stream that changes this little
# they already show some skew (the most chosen expert of a layer takes 14-33% of the choices,
# against 12.5% for uniform), and the prefetch guess finds about 0.8 of the experts needed.
SMOLLM2_LAYER_COSINE = 0.92
PRESET_RESIDUAL_SCALES = {"mixtral-realistic": 0.055}


def preset_folder(name: str) -> Path:
    """The preset as a 4-bit MLX folder, built once from a seeded synthetic checkpoint and
    cached under a name that hashes everything it is built from (a changed preset is rebuilt,
    never mistaken for the old one). On the CPU backend scales are float32, which both
    engines need to run fast."""
    from ..convert import convert
    from ..convert.synthetic import write_hf_checkpoint

    dtype = "float32" if mx.default_device() == mx.cpu else "float16"
    scale = PRESET_RESIDUAL_SCALES.get(name)
    recipe = json.dumps([PRESETS[name], PRESET_BITS, PRESET_GROUP, dtype, PRESET_SEED]
                        + ([scale] if scale is not None else []), sort_keys=True)
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    folder = cache_dir() / "bench" / f"{name}-{digest}"
    if (folder / "config.json").is_file():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        write_hf_checkpoint(tmp, ModelArgs.from_dict(PRESETS[name]), dtype=mx.bfloat16,
                            seed=PRESET_SEED, residual_scale=scale or 1.0)
        convert(tmp, folder, quantize=True, q_bits=PRESET_BITS, q_group_size=PRESET_GROUP,
                dtype=dtype, progress=False, force=True)  # atomic: all or nothing
    return folder


# A run's numbers under bench's names (its report and JSON), and the `Stats` field each one
# reads (the numbers `Clock` computes for every caller). `load_s` is the engine's.
RUN_NUMBERS = {"ttft_s": "ttft", "prefill_tps": "prompt_tps", "decode_tps": "generation_tps",
               "peak_memory": "peak_memory"}


@dataclass
class Engine:
    name: str
    model: Any
    load_s: float
    runs: list[Stats] = field(default_factory=list)

    def numbers(self) -> list[dict[str, float]]:
        """Each run's numbers, by bench's names."""
        return [{"load_s": self.load_s, **{k: getattr(r, v) for k, v in RUN_NUMBERS.items()}}
                for r in self.runs]

    def median(self, key: str) -> float:
        return statistics.median(n[key] for n in self.numbers())


def load_ours(folder: Path, dtype: str | None = None) -> Engine:
    from ..loading import load_model

    start = time.perf_counter()
    model = load_model(folder, lazy=False, dtype=dtype)
    return Engine("mlx-mixtral", model, time.perf_counter() - start)


def load_mlx_lm(folder: Path, dtype: str | None = None) -> Engine:
    from mlx_lm.utils import load_model as mlx_lm_load_model

    from ..model.precision import DTYPES

    start = time.perf_counter()
    model, _ = mlx_lm_load_model(folder)
    if dtype is not None:  # the same dtype as ours, for a like-for-like run
        model.set_dtype(DTYPES[dtype])
    mx.eval(model.parameters())
    return Engine("mlx-lm", model, time.perf_counter() - start)


def make_cache(model: Any) -> list:
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def measure(engine: Engine, prompt: mx.array, gen_tokens: int,
            prefill_step: int = DEFAULT_PREFILL_STEP, kv: KVSettings | None = None) -> Stats:
    from mlx_lm.generate import generate_step

    from ..generation.stats import Clock
    from ..generation.stream import settle

    settle()
    mx.reset_peak_memory()
    cache = make_cache(engine.model)
    clock, tokens = Clock(), []
    for token, _ in generate_step(prompt, engine.model, max_tokens=gen_tokens,
                                  prompt_cache=cache, prefill_step_size=prefill_step,
                                  **(kv or KVSettings()).step_kwargs()):
        clock.first_token()
        tokens.append(token)
    return clock.stats(len(prompt), tokens)


def decode_graph_nodes(model: Any, context: int = 16) -> int:
    """Nodes in the graph of one decode step (after `context` cached tokens)."""
    cache = make_cache(model)
    mx.eval(model(mx.zeros((1, context), mx.int32), cache=cache), [c.state for c in cache])
    logits = model(mx.zeros((1, 1), mx.int32), cache=cache)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step.dot"
        mx.export_to_dot(str(path), logits)
        text = path.read_text()
    mx.eval(logits)
    return sum(1 for line in text.splitlines() if "[label" in line and "->" not in line)


def chat_turns_ttft(model: Any, turns: int = 10, message: int = 16, reply: int = 4,
                    seed: int = 0) -> list[float]:
    """Time to first token of turns 1..N, each a new `message`-token user turn on top of the
    cached conversation (what `ChatSession` does), then a `reply`-token answer."""
    from mlx_lm.generate import generate_step

    rng = np.random.RandomState(seed)
    cache = make_cache(model)
    times = []
    for _ in range(turns):
        tokens = mx.array(rng.randint(3, model.args.vocab_size, message))
        start = time.perf_counter()
        for i, _ in enumerate(generate_step(tokens, model, max_tokens=reply, prompt_cache=cache)):
            if i == 0:
                times.append(time.perf_counter() - start)
    return times


def kv_bytes(model: Any, positions: int, bits: int | None = None, group_size: int = 64) -> int:
    """Bytes of the KV cache after `positions` tokens (quantized to `bits` from the start),
    prefilled 256 at a time. The caches get the keys and values a forward pass would give
    them (its shapes and dtype, learnt from one token), not the model's work: their bytes do
    not depend on the values."""
    probe = make_cache(model)
    mx.eval(model(mx.zeros((1, 1), mx.int32), cache=probe))
    cache = make_cache(model)
    if bits is not None:
        cache = [c.to_quantized(group_size=group_size, bits=bits) for c in cache]
    step = 256
    for start in range(0, positions, step):
        for c, p in zip(cache, probe, strict=True):
            keys, values = (x[..., :1, :] for x in p.state[:2])  # (1, kv heads, 1, head dim)
            n = min(step, positions - start)
            c.update_and_fetch(mx.repeat(keys, n, axis=2), mx.repeat(values, n, axis=2))
        mx.eval([c.state for c in cache])
    return sum(c.nbytes for c in cache)


def kv_bytes_per_token(model: Any, kv_group_size: int = 64) -> dict[str, dict[str, float]]:
    """KV bytes per token at each --kv-bits, and as a share of a float16 cache."""
    args = model.args
    positions = min(256, args.sliding_window or 256)
    float16 = args.kv_bytes_per_token()
    out = {}
    for bits in (None, 8, 4):
        per_token = kv_bytes(model, positions, bits, kv_group_size) / positions
        out["none" if bits is None else str(bits)] = {
            "bytes_per_token": per_token, "vs_float16": per_token / float16}
    return out


class Silent:
    """A tokenizer for token ids in, nothing to show: bench reads only the numbers."""

    eos_ids: frozenset[int] = frozenset()

    def detokenizer(self) -> Any:
        return self

    def add_token(self, token: int) -> str:
        return ""

    def finalize(self) -> str:
        return ""


def drafted_run(model: Any, prompt: mx.array, gen_tokens: int, drafter: Any) -> dict[str, float]:
    """Greedy generation with `drafter`: acceptance and the model's passes per token."""
    from ..generation import Stats, stream_generate
    from ..generation.sampling import SamplingParams

    greedy = SamplingParams(temperature=0, min_p=0, max_tokens=gen_tokens)
    stats = next(s for s in stream_generate(model, Silent(), prompt.tolist(), sampling=greedy,
                                            draft=drafter) if isinstance(s, Stats))
    return {"acceptance": stats.draft_accepted / max(stats.draft_proposed, 1),
            "passes_per_token": stats.forward_passes / max(stats.generation_tokens, 1),
            "decode_tps": stats.generation_tps}


def batch_throughput(model: Any, batch: int, prompt: int = 16, gen: int = 8) -> float:
    """Generated tokens per second for `batch` prompts decoded together."""
    cache = make_cache(model)
    tokens = mx.array(np.random.RandomState(batch).randint(3, model.args.vocab_size,
                                                           (batch, prompt)))
    logits = model(tokens, cache=cache)
    mx.eval(logits)
    start = time.perf_counter()
    for _ in range(gen):
        y = mx.argmax(logits[:, -1, :], axis=-1)[:, None]
        logits = model(y, cache=cache)
        mx.async_eval(logits)
    mx.eval(logits)
    return batch * gen / (time.perf_counter() - start)


METRICS = [  # (key, label, higher is better)
    ("prefill_tps", "prefill tok/s", True),
    ("decode_tps", "decode tok/s", True),
    ("ttft_s", "time to first token (s)", False),
    ("peak_memory", "peak memory (GB)", False),
    ("load_s", "load time (s)", False),
]


def run_bench(folder: Path, prompt_tokens: int = 256, gen_tokens: int = 64, runs: int = 3,
              compare: bool = False, extras: bool = True, dtype: str | None = None,
              log: Callable[[str], None] = print, drafting: Callable | None = None,
              kv: KVSettings | None = None) -> dict[str, Any]:
    ours = load_ours(folder, dtype)
    engines = [ours]
    if compare:
        engines.append(load_mlx_lm(folder, dtype))
    vocab = ours.model.args.vocab_size
    prompt = mx.array(np.random.RandomState(0).randint(3, vocab, prompt_tokens))
    for engine in engines:  # warm up: first-call allocations and kernel setup
        measure(engine, prompt[:32], 4)
    for r in range(runs):
        order = engines if r % 2 == 0 else engines[::-1]  # alternate who goes first
        for engine in order:
            engine.runs.append(measure(engine, prompt, gen_tokens, kv=kv))
        log(f"run {r + 1}/{runs} done")
    result: dict[str, Any] = {
        "model": str(folder), "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
        "runs": runs, "device": str(mx.default_device()),
        "engines": {e.name: {k: e.median(k) for k, _, _ in METRICS} for e in engines},
        "all_runs": {e.name: e.numbers() for e in engines},
    }
    if compare:
        a, b = result["engines"]["mlx-mixtral"], result["engines"]["mlx-lm"]
        result["ratios"] = {k: (a[k] / b[k] if better else b[k] / a[k])
                            for k, _, better in METRICS if a[k] and b[k]}
        result["decode_graph_nodes"] = {e.name: decode_graph_nodes(e.model) for e in engines}
    if extras:
        model = ours.model
        result["chat_ttft_turns_s"] = chat_turns_ttft(model)
        window = model.args.sliding_window
        if window:
            result["kv_bytes"] = {"1x_window": kv_bytes(model, window),
                                  "4x_window": kv_bytes(model, 4 * window)}
        result["batch_tps"] = {str(b): batch_throughput(model, b) for b in (1, 4, 8)}
        group = (kv or KVSettings()).group_size
        if model.args.head_dim % group == 0:
            result["kv_per_token"] = kv_bytes_per_token(model, group)
    if drafting is not None:
        result["drafted"] = drafted_run(ours.model, prompt, gen_tokens,
                                        drafting(ours.model, None))
    return result


def format_result(result: dict[str, Any]) -> str:
    engines = result["engines"]
    names = list(engines)
    head = f"{'':<26}" + "".join(f"{n:>14}" for n in names)
    if "ratios" in result:
        head += f"{'ratio':>10}"
    lines = [f"{result['model']}  ({result['prompt_tokens']} prompt tokens, "
             f"{result['gen_tokens']} generated, median of {result['runs']} runs, "
             f"{result['device']})", head]
    for key, label, _ in METRICS:
        scale = 1e9 if key == "peak_memory" else 1
        row = f"{label:<26}" + "".join(f"{engines[n][key] / scale:>14.3f}" for n in names)
        if "ratios" in result and key in result["ratios"]:
            row += f"{result['ratios'][key]:>9.2f}x"
        lines.append(row)
    if "decode_graph_nodes" in result:
        nodes = result["decode_graph_nodes"]
        lines.append(f"{'graph nodes per decode step':<26}"
                     + "".join(f"{nodes[n]:>14}" for n in names))
    if "chat_ttft_turns_s" in result:
        turns = result["chat_ttft_turns_s"]
        lines.append("chat TTFT turns 1..10 (s): " + " ".join(f"{t:.3f}" for t in turns)
                     + f"  (turn 10 / turn 1 = {turns[-1] / turns[0]:.2f})")
    if "kv_bytes" in result:
        kv = result["kv_bytes"]
        lines.append(f"KV cache bytes: {kv['1x_window']} at 1x the window, "
                     f"{kv['4x_window']} at 4x")
    if "kv_per_token" in result:
        lines.append("KV bytes per token: " + ", ".join(
            f"{'float' if b == 'none' else b + '-bit'} {v['bytes_per_token']:.0f} "
            f"({v['vs_float16']:.2f}x float16)" for b, v in result["kv_per_token"].items()))
    if "drafted" in result:
        d = result["drafted"]
        lines.append(f"drafted decoding: {d['acceptance']:.0%} of drafts accepted, "
                     f"{d['passes_per_token']:.2f} model passes per generated token, "
                     f"{d['decode_tps']:.1f} tok/s")
    if "batch_tps" in result:
        lines.append("batch decode tok/s: " + ", ".join(
            f"{b} prompts {t:.1f}" for b, t in result["batch_tps"].items()))
    return "\n".join(lines)


def bench_main(model: str | None, preset: str | None, prompt_tokens: int, gen_tokens: int,
               runs: int, compare: bool, as_json: bool, force: bool = False,
               dtype: str | None = None, drafting: Callable | None = None,
               kv: KVSettings | None = None) -> str:
    from ..errors import WeightsError
    from ..loading import describe, resolve
    from ..loading.memory import check_fits

    folder = preset_folder(preset) if preset else resolve(model)
    if compare and not Path(folder).is_dir():
        raise WeightsError(f"{folder}: --compare mlx-lm needs an MLX or Hugging Face folder "
                           "(mlx-lm cannot run GGUF files); leave out --compare to bench "
                           "this model alone")
    check_fits(describe(Path(folder)), force, dtype)
    result = run_bench(Path(folder), prompt_tokens, gen_tokens, runs, compare, dtype=dtype,
                       log=lambda m: None if as_json else print(m, flush=True),
                       drafting=drafting, kv=kv)
    return json.dumps(result, indent=2) if as_json else format_result(result)


def bench_distributed(plan: LoadPlan, prompt_tokens: int, gen_tokens: int, runs: int,
                      beat: Callable[[], None]) -> str | None:
    """Under mlx.launch: our engine with the model split over the ranks as `plan` says; tok/s
    (medians) and each rank's peak memory. The text is rank 0's to print (None on the other
    ranks)."""
    from ..generation.stream import prefill_chunk, settle
    from ..loading import load_planned

    group, folder = plan.group, plan.source.path
    start = time.perf_counter()
    model, _ = load_planned(plan, tokenizer=False)
    mx.eval(model.parameters())
    peak = mx.get_peak_memory()  # loading's: each run below resets the counter
    mode = "pipeline" if plan.pipeline else "tensor parallel"
    engine = Engine(f"mlx-mixtral over {group.size()} ranks ({mode})", model,
                    time.perf_counter() - start)
    beat()
    prompt = mx.array(np.random.RandomState(0).randint(3, model.args.vocab_size, prompt_tokens))
    step = prefill_chunk(model)  # (within a budget, the plan's)
    peak = max(peak, measure(engine, prompt[:32], 4, step).peak_memory)  # warm up
    for _ in range(runs):
        engine.runs.append(measure(engine, prompt, gen_tokens, step))
        peak = max(peak, engine.runs[-1].peak_memory)
        beat()
    # Each rank's peak over the whole process, loading included.
    # After the step generate_step computed ahead has run its own collectives, on its own
    # stream: a gather started before them mixed with them (rank 1's peak came back as KB).
    settle()
    peaks = mx.distributed.all_gather(mx.array([peak / 1e6]), group=group)
    peaks = [p * 1e6 for p in peaks.tolist()]
    if group.rank() != 0:
        return None
    lines = [f"{engine.name}: {folder}", f"  prompt {prompt_tokens} tokens, generate "
             f"{gen_tokens}, medians of {runs} runs"]
    for key, label, _ in METRICS:
        if key != "peak_memory":
            lines.append(f"  {label:<22} {engine.median(key):10.3f}")
    lines += [f"  peak memory, rank {r}:   {size(p)} (loading included)"
              for r, p in enumerate(peaks)]
    if plan.memory is not None:
        lines.append(f"  budget per rank:       {size(plan.memory.budget)} (rank 0: "
                     f"{plan.memory.slots} of {plan.memory.experts} experts per layer in "
                     "memory)")
    return "\n".join(lines)
