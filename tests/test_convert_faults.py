"""The converter under bad input and SIGKILL: one clear line, exit 2, never a partial OUT."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_mixtral import ModelArgs
from mlx_mixtral.convert.synthetic import write_hf_checkpoint

TINY = dict(model_type="mixtral", vocab_size=256, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=4, num_experts_per_tok=2)


def convert_cli(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_mixtral.cli", "convert", "--hf-path", str(src),
         "--mlx-path", str(out), *extra], capture_output=True, text=True)


@pytest.fixture
def good(tmp_path) -> Path:
    write_hf_checkpoint(tmp_path / "good", ModelArgs.from_dict(TINY), dtype=mx.float32,
                        shard_bytes=200_000)
    return tmp_path / "good"


def break_missing_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def break_truncated_safetensors(folder: Path) -> None:
    shard = sorted(folder.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def break_only_bin(folder: Path) -> None:
    for shard in folder.glob("*.safetensors"):
        shard.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")


def break_unknown_architecture(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(config))


def break_garbage_header(folder: Path) -> None:
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.write_bytes((40).to_bytes(8, "little") + b"{this is not json at all, sorry!!!}xxxxx")


@pytest.mark.parametrize("damage, words", [
    (break_missing_config, ["no config.json"]),
    (break_truncated_safetensors, ["truncated", "model-00001"]),
    (break_only_bin, ["pickled", "pytorch_model.bin", "safetensors"]),
    (break_unknown_architecture, ["unsupported model_type 'mamba'"]),
    (break_garbage_header, ["corrupt safetensors header"]),
])
def test_bad_input_one_line_exit_2(good, tmp_path, damage, words):
    damage(good)
    out = tmp_path / "out"
    result = convert_cli(good, out)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlx-mixtral: error: "), result.stderr
    for word in words:
        assert word in lines[0]
    assert "Traceback" not in result.stderr
    assert not out.exists()


def convert_proc(src: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mlx_mixtral.cli", "convert", "--hf-path", str(src),
         "--mlx-path", str(out), "-q", "--shard-size-gb", "0.01"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def partials(folder: Path) -> list[Path]:
    return list(folder.glob(".out.partial-*"))


def timed_convert(src: Path, out: Path) -> tuple[float, float]:
    """(seconds until the partial folder appears, seconds until the convert ends)."""
    start, appeared = time.monotonic(), None
    proc = convert_proc(src, out)
    while proc.poll() is None:
        if appeared is None and partials(out.parent):
            appeared = time.monotonic() - start
        time.sleep(0.005)
    assert proc.returncode == 0
    return appeared, time.monotonic() - start


@pytest.mark.alone  # kills at moments timed on an earlier run
def test_sigkill_at_10_random_moments_leaves_no_partial_out(tmp_path):
    """Each kill lands at a random moment of the convert's work (from the moment its partial
    folder exists: reading, quantizing, writing shards, the final rename). OUT is then either
    absent or the complete, loadable conversion; a later run succeeds and removes stale
    partials."""
    from mlx_mixtral import load_model

    big = dict(TINY, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
               num_local_experts=8)  # ~300 MB of float32: about a second of writing
    src = tmp_path / "src"
    write_hf_checkpoint(src, ModelArgs.from_dict(big), dtype=mx.float32, shard_bytes=50 * 10**6)
    out = tmp_path / "out"
    for _ in range(2):  # the first run of a fresh checkout also compiles bytecode
        appeared, ended = timed_convert(src, out)
        shutil.rmtree(out)
    work = ended - appeared
    rng = random.Random(0)
    killed_mid_work = 0
    for _ in range(10):
        proc = convert_proc(src, out)
        deadline = time.time() + 60
        while not partials(tmp_path) and proc.poll() is None:
            assert time.time() < deadline
            time.sleep(0.002)
        time.sleep(rng.uniform(0, work))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():  # the kill came after the final rename: OUT must be whole
            load_model(out, lazy=False)
            shutil.rmtree(out)
        else:
            killed_mid_work += 1
    assert killed_mid_work >= 5
    result = convert_cli(src, out, "-q")
    assert result.returncode == 0, result.stderr
    load_model(out, lazy=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # stale partials gone
    print(f"\nconvert work {work:.2f} s; {killed_mid_work} of 10 kills before it finished")
