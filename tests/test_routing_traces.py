"""Routing traces and the prefetch guess's accuracy, on the realistic tiny Mixtral: a trace
recorded by `bench --max-memory` replayed without the model predicts the hit rates measured
live, and the guess is reported per layer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_mixtral.cli.bench import PRESETS, preset_folder
from mlx_mixtral.cli.bench_paging import bench_paging
from mlx_mixtral.model.expert_cache import ExpertPager
from mlx_mixtral.model.routing_trace import (
    CountingLoader,
    RoutingTrace,
    TraceRecorder,
    load_trace,
    remember_trace,
    replay,
    save_trace,
)

BUDGETS = "60%,70%,90%"  # 3, 4 and 5 of 8 experts per layer in memory
LAYERS = PRESETS["mixtral-realistic"]["num_hidden_layers"]


PROMPT, GEN = 8, 16


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """bench --max-memory at three budgets, recording the routing: (its JSON, the trace's
    path). 20-45 s on two busy cores (3 budgets x 3 variants x 2 runs, and the preset's
    build), hence `slow` on the tests that use it."""
    path = tmp_path_factory.mktemp("trace") / "routing.json"
    with pytest.MonkeyPatch.context() as patch:  # what bench keeps stays out of other tests
        patch.setenv("MLX_MIXTRAL_DATA_DIR", str(tmp_path_factory.mktemp("data")))
        result = json.loads(bench_paging(preset_folder("mixtral-realistic"), BUDGETS, PROMPT,
                                         GEN, 1, None, True, record=path))
    return result, path


@pytest.mark.slow
def test_the_guess_is_reported_per_layer_and_finds_most_experts_at_4_of_8(live):
    result, _ = live
    entry = next(e for e in result["budgets"] if e["slots"] == 4)
    v = entry["variants"]["lru+prefetch"]
    rates = v["decode_guess_rates"]
    assert len(rates) == LAYERS and rates[0] is None  # the first layer is never guessed
    assert all(0 <= r <= 1 for r in rates[1:])
    assert v["decode_guess_rate"] >= 0.6, rates
    assert v["decode_guess_rate"] == pytest.approx(np.mean(rates[1:]), abs=0.02)
    assert entry["variants"]["lru"]["decode_guess_rate"] is None  # no prefetch, no guess


@pytest.mark.slow
def test_a_replayed_trace_predicts_the_live_hit_rates(live):
    """3 budgets x both policies (and LRU without the guess): the replay's decode hit rate
    within 2 points of live, its reads within 2%."""
    result, path = live
    trace = load_trace(path)
    checked = 0
    for entry in result["budgets"]:
        for key, v in entry["variants"].items():
            policy, prefetch = key.split("+")[0], key.endswith("+prefetch")
            r = replay(trace, entry["slots"], policy, prefetch)
            assert abs(r.decode_hit_rate - v["decode_hit_rate"]) <= 0.02, (entry["slots"], key)
            assert r.bytes_per_token == pytest.approx(v["bytes_per_token"], rel=0.02), \
                (entry["slots"], key)
            checked += 1
    assert checked == 9 and {e["slots"] for e in result["budgets"]} == {3, 4, 5}


@pytest.mark.slow
def test_the_trace_holds_every_layer_of_every_pass(live):
    result, path = live
    data = json.loads(path.read_text())
    model = data["model"]
    assert (model["num_layers"], model["num_experts"], model["top_k"]) == (LAYERS, 8, 2)
    assert model["name"] == result["model"] and model["args"]["hidden_size"] == 256
    runs = data["runs"]
    assert len(runs) == 2  # bench's warm-up run, then the measured one
    for run, (prompt, tokens) in zip(runs, [(PROMPT, 8), (PROMPT, GEN)], strict=True):
        assert run["tokens"] == tokens
        chosen = [len(layer["chosen"]) for p in run["passes"] for layer in p[:1]]
        assert sum(chosen) >= 2 * (prompt + tokens - 1)  # every token's top-2 in each pass
        for p in run["passes"]:
            assert len(p) == LAYERS
            assert [layer["guess"] is None for layer in p] == [False] * (LAYERS - 1) + [True]
            assert len({len(layer["chosen"]) for layer in p}) == 1


@pytest.mark.slow
def test_replay_on_the_command_line(live, cli_here):
    _, path = live
    r = cli_here("bench", "--replay-routing", str(path), "--slots", "2,4", "--json")
    assert r.returncode == 0, r.stderr
    cases = json.loads(r.stdout)["cases"]
    assert [(c["slots"], c["policy"], c["prefetch"]) for c in cases] == [
        (s, p, f) for s in (2, 4) for p in ("lru", "lfu") for f in (True, False)]
    assert cases[0]["decode_hit_rate"] < cases[4]["decode_hit_rate"]  # more slots, more hits
    text = cli_here("bench", "--replay-routing", str(path), "--max-memory", "70%").stdout
    assert "4 of 8 slots  lfu+prefetch  hit rate" in text and "read per token" in text


def test_the_guess_counts_what_it_predicted_not_what_was_resident():
    """Layer 1's experts 0 and 1 are resident, the guess predicted 2 and 3, and the pass
    needs 0 and 2: two hits, one of them guessed."""
    pager = ExpertPager(8, 4, [None, None], 2, CountingLoader(1))
    try:
        pager.fill(1, [0, 1])  # resident before
        pager.reset_stats()
        for group in pager.begin(0, np.array([[5, 6]]), np.array([[2, 3]])):
            pager.fill(0, group)
        for group in pager.begin(1, np.array([[0, 2]]), None):
            pager.fill(1, group)
        pager.wait()
        first, second = pager.stats.layers
    finally:
        pager.close()
    assert first.guess_rate is None  # nothing guesses the first layer
    assert (second.needed, second.hits, second.guessable, second.guessed) == (2, 2, 2, 1)
    assert second.guess_rate == 0.5 and second.prefetch_hits == 1


def synthetic_trace() -> RoutingTrace:
    """A trace written by hand (no model): 4 layers of 8 experts, one token per pass, each
    layer's choice sticking to its previous one half the time, and a guess that is right
    about one expert in two."""
    rng = np.random.RandomState(0)
    trace = RoutingTrace({"name": "hand-made", "num_layers": 4, "num_experts": 8, "top_k": 2,
                          "expert_bytes": 1000, "recorded": "today"})
    recorder = TraceRecorder(trace)
    last = [[0, 1]] * 4
    for _ in range(2):
        recorder.start_run()
        for step in range(40):
            if step == 1:
                recorder.mark_decode()
            chosen = [last[i] if rng.rand() < 0.5 else rng.choice(8, 2, replace=False).tolist()
                      for i in range(4)]
            for layer in range(4):
                guess = None if layer == 3 else [chosen[layer + 1][0], int(rng.randint(8))]
                recorder.layer(layer, np.array([chosen[layer]]), guess and np.array([guess]))
            last = chosen
        recorder.run.tokens = 40
    return trace


def test_info_estimates_streaming_from_a_recorded_trace(monkeypatch, tmp_path):
    """With a trace recorded here, `info --memory` adds one line per paging plan, labelled with
    the trace's file: the hit rate the trace's replay gives at that share of experts, and the
    bytes and tokens/s that follow; the plans themselves do not change."""
    from mlx_mixtral.cli.bench_routing import READ_BYTES_PER_S
    from mlx_mixtral.cli.info import info
    from mlx_mixtral.units import parse_size

    monkeypatch.setenv("MLX_MIXTRAL_DATA_DIR", str(tmp_path))
    plain = info(preset_name="mixtral-8x7b", memory=16 * 10**9).splitlines()
    trace, path = synthetic_trace(), tmp_path / "trace.json"
    save_trace(trace, path)
    remember_trace(path)
    lines = info(preset_name="mixtral-8x7b", memory=16 * 10**9).splitlines()
    assert lines[:len(plain)] == plain
    head, *rows = lines[len(plain):]
    assert head.startswith(f"  from the routing trace {path} (hand-made, recorded today)")
    paging = [line.split()[0] for line in plain if "paging:" in line]
    assert [r.split()[0] for r in rows] == paging and len(paging) == 6
    four_bit = next(line for line in plain if line.split()[:1] == ["4-bit"])
    assert "paging: 4 of 8 experts" in four_bit
    r = replay(load_trace(path), 4)  # the trace's model has 8 experts too: 4 slots
    row = next(r for r in rows if r.split()[0] == "4-bit")
    assert f"hit rate {r.decode_hit_rate:.0%}," in row
    per_token = parse_size(row.split("about ")[1].split(" read per token")[0].replace(" ", ""))
    speed = float(row.split("reading allows ")[1].split()[0])
    assert speed == pytest.approx(READ_BYTES_PER_S / per_token, rel=0.1)
    path.write_text("{}")  # a damaged trace: no estimate, no error
    assert info(preset_name="mixtral-8x7b", memory=16 * 10**9).splitlines() == plain


def test_a_mistake_or_a_damaged_trace_is_one_line(cli_here, tmp_path):
    path = tmp_path / "trace.json"
    save_trace(synthetic_trace(), path)
    assert cli_here("bench", "--replay-routing", str(path), "--slots", "4").returncode == 0
    good = json.loads(path.read_text())

    def damaged(change) -> str:
        data = json.loads(json.dumps(good))
        change(data)
        out = tmp_path / f"damaged-{len(list(tmp_path.iterdir()))}.json"
        out.write_text(json.dumps(data))
        return str(out)

    cases = {  # what is wrong: (the bench arguments, what the line says)
        "a layer missing": (["--replay-routing", damaged(
            lambda d: d["runs"][1]["passes"][3].pop(2)), "--slots", "4"],
            "run 2, pass 4: 3 layers, the model has 4"),
        "an expert beyond the model's": (["--replay-routing", damaged(
            lambda d: d["runs"][0]["passes"][0][1]["chosen"].__setitem__(0, 8)), "--slots",
            "4"], "expert ids below 8"),
        "a guess past the last layer": (["--replay-routing", damaged(
            lambda d: d["runs"][0]["passes"][0][3].__setitem__("guess", [1, 2])), "--slots",
            "4"], "no next layer"),
        "not a trace": (["--replay-routing", damaged(lambda d: d.pop("format")), "--slots",
                         "4"], "not a routing trace"),
        "no file": (["--replay-routing", str(tmp_path / "none.json"), "--slots", "4"],
                    "cannot read"),
        "no budgets": (["--replay-routing", str(path)], "--max-memory SIZE"),
        "too many slots": (["--replay-routing", str(path), "--slots", "9"], "between 2"),
        "--slots alone": (["--slots", "4"], "--slots is for --replay-routing"),
        "recording unpaged": (["--record-routing", str(tmp_path / "t.json")],
                              "give --max-memory too"),
        "no such folder": (["--max-memory", "70%", "--record-routing",
                            str(tmp_path / "no" / "t.json")], "is not a folder"),
    }
    for what, (args, says) in cases.items():
        r = cli_here("bench", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (what, r.stderr)
        assert says in r.stderr, (what, r.stderr)


def test_bench_takes_medians_over_runs_and_a_middle_run_per_layer():
    from mlx_mixtral.cli.bench_paging import PagedRun, median_run

    runs = [PagedRun(1.0, 2.0, 30, [0.5, 0.6], 0.55, 0.1, 9.0, [None, r], r)
            for r in (0.7, 0.9, 0.8)]
    runs.append(PagedRun(1.0, 4.0, 10, [0.5, 0.6], 0.55, 0.1, 9.0, [None, None], None))
    got = median_run(runs[:3])
    assert (got["decode_tps"], got["peak_memory"], got["decode_guess_rate"]) == (2.0, 30, 0.8)
    assert got["decode_guess_rates"] == [None, 0.9]  # the middle run's, as listed
    assert median_run(runs[3:])["decode_guess_rate"] is None
