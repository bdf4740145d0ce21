"""Routing traces: which experts every token chose in every MoE layer of every forward pass, and
what the prefetch guessed, recorded from a live run and replayed through the expert cache
without the model.

A trace is JSON (never pickle): the model's identity and shape, then runs (one generation
each) of forward passes; a pass holds, per layer, the experts its tokens chose (flattened,
`top_k` per token) and the experts the layer's guess predicted for the next layer (null for
the last layer, or without prefetch). `decode_from` is the pass at which a run's decode
statistics start (as `bench --max-memory` counts them).

Replaying builds an `ExpertPager` over a loader that only counts, and calls `ExpertPager.begin`
and `fill` exactly as `PagedMoE` does: the same slots, evictions and prefetches as live, for
any slot count and policy, in a fraction of a second per thousand passes.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MlxMixtralError
from .expert_cache import ExpertPager, LayerStats, PagingStats

TRACE_FORMAT = "mlx-mixtral routing trace"
TRACE_VERSION = 1


class TraceError(MlxMixtralError):
    """A routing trace that cannot be read or does not fit its own header."""


@dataclass
class TraceRun:
    passes: list[list[dict[str, list[int] | None]]] = field(default_factory=list)
    decode_from: int = 0  # the first pass counted as decoding
    tokens: int = 0  # tokens generated


@dataclass
class RoutingTrace:
    model: dict[str, Any]  # name, num_layers, num_experts, top_k, expert_bytes, ... (bench's)
    runs: list[TraceRun] = field(default_factory=list)
    path: str = ""  # the file it was read from

    @property
    def num_layers(self) -> int:
        return int(self.model["num_layers"])

    def to_json(self) -> dict[str, Any]:
        return {"format": TRACE_FORMAT, "version": TRACE_VERSION, "model": self.model,
                "runs": [vars(r) for r in self.runs]}


class TraceRecorder:
    """Collects a live pager's routing (`ExpertPager.recorder`), a pass at a time: layer 0
    starts a new pass."""

    def __init__(self, trace: RoutingTrace) -> None:
        self.trace = trace
        self.run: TraceRun | None = None

    def start_run(self) -> None:
        self.run = TraceRun()
        self.trace.runs.append(self.run)

    def mark_decode(self) -> None:
        """Passes from here on are the run's decoding."""
        assert self.run is not None
        self.run.decode_from = len(self.run.passes)

    def layer(self, layer: int, chosen: np.ndarray, guess: np.ndarray | None) -> None:
        if self.run is None:  # passes outside a run (a warm-up) are not traced
            return
        if layer == 0:
            self.run.passes.append([])
        self.run.passes[-1].append({
            "chosen": np.asarray(chosen).reshape(-1).tolist(),
            "guess": None if guess is None else np.asarray(guess).reshape(-1).tolist()})


def save_trace(trace: RoutingTrace, path: Path) -> None:
    from ..user_files import write_json

    write_json(path, trace.to_json(), indent=None)


def _ints(value: Any, what: str, limit: int) -> list[int]:
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < limit for v in value):
        raise TraceError(f"{what}: expected a list of expert ids below {limit}")
    return value


def load_trace(path: Path) -> RoutingTrace:
    """The trace in `path`, checked against its own header; TraceError (one line) if not."""
    from ..jsonfile import read_json_object

    data = read_json_object(path, TraceError, "record one with bench's record option")
    if data.get("format") != TRACE_FORMAT or data.get("version") != TRACE_VERSION:
        raise TraceError(f"{path}: not a routing trace (version {TRACE_VERSION}) as bench "
                         "records them")
    model = data.get("model")
    try:
        layers, experts, top_k = (int(model[k]) for k in ("num_layers", "num_experts", "top_k"))
        int(model["expert_bytes"])
        runs = [TraceRun(r["passes"], int(r["decode_from"]), int(r["tokens"]))
                for r in data["runs"]]
    except (KeyError, TypeError, ValueError):
        raise TraceError(f"{path}: damaged routing trace (its model or runs are incomplete)"
                         ) from None
    for i, run in enumerate(runs):
        if not isinstance(run.passes, list) or not 0 <= run.decode_from <= len(run.passes):
            raise TraceError(f"{path}: run {i + 1}: damaged (passes or decode_from)")
        for j, layers_of_pass in enumerate(run.passes):
            where = f"{path}: run {i + 1}, pass {j + 1}"
            if not isinstance(layers_of_pass, list) or len(layers_of_pass) != layers:
                raise TraceError(f"{where}: {len(layers_of_pass)} layers, the model has "
                                 f"{layers}")
            for layer, entry in enumerate(layers_of_pass):
                if not isinstance(entry, dict):
                    raise TraceError(f"{where}, layer {layer}: damaged")
                _ints(entry.get("chosen"), f"{where}, layer {layer}", experts)
                if entry.get("guess") is not None:
                    if layer == layers - 1:
                        raise TraceError(f"{where}: the last layer has no next layer to guess")
                    _ints(entry["guess"], f"{where}, layer {layer}", experts)
    if not runs or top_k < 1:
        raise TraceError(f"{path}: the trace holds no runs")
    return RoutingTrace(model, runs, str(path))


class CountingLoader:
    """An `ExpertLoader` that reads nothing: each expert costs `expert_bytes`."""

    def __init__(self, expert_bytes: int) -> None:
        self.expert_bytes = expert_bytes

    def load(self, layer: int, expert: int, slot: int) -> int:
        return self.expert_bytes

    def close(self) -> None:
        pass


@dataclass
class ReplayResult:
    decode_hit_rate: float  # median over the runs after the first (the first warms the slots)
    decode_hit_rates: list[float]  # per layer, of the median run
    guess_rate: float | None  # share of needed experts the guess predicted
    reads_per_token: float
    bytes_per_token: float


def replay(trace: RoutingTrace, slots: int, policy: str = "lru",
           prefetch: bool = True) -> ReplayResult:
    """The trace's runs through `slots` slots per layer, from empty slots, as live; the first
    run warms the cache (as bench's warm-up does), the others are measured (all of them when
    there is one)."""
    m = trace.model
    pager = ExpertPager(int(m["num_experts"]), slots, [None] * trace.num_layers,
                        int(m["top_k"]), CountingLoader(int(m["expert_bytes"])), policy,
                        prefetch)
    pager.baseline = True  # reads take no time here: every prefetch finishes in time
    measured: list[tuple[PagingStats, int]] = []
    try:
        for run in trace.runs:
            pager.reset_stats()
            at_decode = copy.deepcopy(pager.stats)
            for i, layers in enumerate(run.passes):
                if i == run.decode_from:
                    pager.wait()
                    at_decode = copy.deepcopy(pager.stats)
                for layer, entry in enumerate(layers):
                    guess = entry["guess"] if prefetch else None
                    groups = pager.begin(layer, np.array(entry["chosen"]),
                                         None if guess is None else np.array(guess))
                    for group in groups:
                        pager.fill(layer, group)
            pager.wait()
            measured.append((pager.stats.since(at_decode), run.tokens))
    finally:
        pager.close()
    if len(measured) > 1:
        measured = measured[1:]
    rates = [s.total().hit_rate for s, _ in measured]
    median = sorted(range(len(rates)), key=rates.__getitem__)[len(rates) // 2]
    stats, _ = measured[median]
    total = LayerStats()
    for s, _ in measured:
        for name, value in vars(s.total()).items():
            setattr(total, name, getattr(total, name) + value)
    tokens = sum(max(n - 1, 1) for _, n in measured)  # decode passes, as bench counts them
    return ReplayResult(statistics.median(rates), [s.hit_rate for s in stats.layers],
                        total.guess_rate, total.reads / tokens, total.bytes_read / tokens)


TRACE_POINTER_FILE = "routing-trace.json"  # in the data folder: where the last trace went


def remember_trace(path: Path) -> None:
    from ..user_files import data_dir, write_json

    write_json(data_dir() / TRACE_POINTER_FILE, {"path": str(Path(path).resolve())})


def recorded_trace() -> RoutingTrace | None:
    """The trace the last `bench --record-routing` here wrote, if it is still readable."""
    from ..jsonfile import read_json_object
    from ..user_files import data_dir

    pointer = data_dir() / TRACE_POINTER_FILE
    if not pointer.is_file():
        return None
    try:
        trace = load_trace(Path(str(read_json_object(pointer, TraceError)["path"])))
    except (TraceError, KeyError):
        return None
    return trace
