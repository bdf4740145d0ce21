"""`mlx-mixtral cache`: the prefix store's folder, budgets and blocks per model, and
`cache clear` to delete them. Reads files only: no model is loaded."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import MlxMixtralError
from ..units import count, size
from .commands import add_command


def add_cache(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "cache", run_cache)
    p.add_argument("action", nargs="?", choices=["show", "clear"], default="show",
                   help="show the store, or clear it: delete the blocks on disk at once, no "
                   "question asked (default: show)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="only this model's blocks: its NAME as the listing shows it (as it was "
                   "given to --model) or its fingerprint")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run_cache(args: argparse.Namespace) -> int:
    from ..prefixes.folder import clear_space, spaces
    from ..prefixes.settings import store_folder

    root = store_folder()
    found = spaces(root)
    if args.model is not None:
        found = [s for s in found if s.matches(args.model)]
        if not found:
            known = sorted({s.name for s in spaces(root)})
            raise MlxMixtralError(f"--model {args.model}: the prefix store has no blocks of it"
                                  + (f"; it has: {', '.join(known)}" if known
                                     else "; it is empty"))
    if args.action == "clear":
        freed = [(s, *clear_space(s)) for s in found]
        blocks, nbytes = sum(f[1] for f in freed), sum(f[2] for f in freed)
        if args.json:
            print(json.dumps({"folder": str(root), "blocks_freed": blocks, "bytes_freed": nbytes,
                              "models": sorted({s.name for s, *_ in freed})}))
        else:
            print(f"Freed {size(nbytes)}: {count(blocks, 'block')} of "
                  f"{count(len(freed), 'model')} in {root}")
        return 0
    print(json.dumps(_as_json(root, found), indent=2) if args.json else _table(root, found))
    return 0


def _budgets(root: Path) -> tuple[int, int]:
    """The default budgets (RAM per process, disk for the folder): what the flags change."""
    from ..prefixes.settings import default_disk, default_ram

    return default_ram(), default_disk(root)


def _as_json(root: Path, found: list) -> dict:
    ram, disk = _budgets(root)
    return {"folder": str(root), "ram_budget": ram, "disk_budget": disk,
            "disk_bytes": sum(s.nbytes for s in found), "spaces": [s.as_json() for s in found]}


def _table(root: Path, found: list) -> str:
    ram, disk = _budgets(root)
    used = sum(s.nbytes for s in found)
    lines = [f"Prefix store: {root}",
             f"RAM tier: up to {size(ram)} in each running server or chat (--cache-ram; "
             "emptied when it ends)",
             f"Disk tier: {size(used)} of {size(disk)} (--cache-disk; kept across runs)", ""]
    if not found:
        return "\n".join([*lines, "No blocks yet: generate, serve and chat keep a prompt's "
                          "blocks as they read it."])
    width = max(len("MODEL"), *(len(s.name) for s in found))
    lines.append(f"{'MODEL':<{width}}  {'FINGERPRINT':<16}  {'KV':<18}  {'TOKENS/BLOCK':>12}  "
                 f"{'BLOCKS':>6}  {'ON DISK':>9}")
    lines += [f"{s.name:<{width}}  {s.model[:16]:<16}  {s.kv:<18}  "
              f"{s.about.get('block', '?'):>12}  {s.blocks:>6}  {size(s.nbytes):>9}"
              for s in found]
    lines.append("\n`mlx-mixtral cache clear` deletes them all, `--model NAME` one model's; "
                 "--no-prompt-cache leaves the store out of a generate.")
    return "\n".join(lines)
