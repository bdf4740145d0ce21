"""What the command-line tests share: the command run in a subprocess, and a tiny windowed
Mistral folder with a tokenizer."""

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


def refusal(argv: list[str], capsys) -> str:
    """The one line stderr holds after `argv` ended with exit status 2."""
    from mlx_mixtral.cli.main import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals exit from inside parse_args
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, (code, err)
    return err.strip()
