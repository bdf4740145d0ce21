"""What the command-line tests share: the command run in a subprocess or in this process, and a
tiny windowed Mistral folder with a tokenizer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import build_hf, tiny_tokenizer


def cli(*args: str, env: dict | None = None, cwd: Path | None = None):
    return subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=cwd)


def tiny_folder(path: Path) -> Path:
    build_hf(path, "mistral", sliding_window=8)
    tiny_tokenizer().save_pretrained(path)
    return path


def subparser(command: str):
    """`command`'s own argparse parser."""
    import argparse

    from mlx_mixtral.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """`mlx-mixtral ARGS` run by `main` in this process, as `cli` reports it: the same exit
    status, stdout and stderr, without a new process's ~2.5 s of imports. (Not for what only a
    process has: pipes, signals, the shell's exit status.)"""
    from mlx_mixtral.cli.main import main

    capsys.readouterr()  # what came before is not this command's
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own refusals exit from inside parse_args
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["mlx-mixtral", *args], code, out, err)


def refusal(argv: list[str], capsys) -> str:
    """The one line stderr holds after `argv` ended with exit status 2."""
    result = in_process(capsys, *argv)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result
    return result.stderr.strip()
