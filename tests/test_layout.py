"""The package's shape: which folder may import which, no cycles, a light top-level import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import seeing

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_mixtral"
LEAVES = {"errors", "units", "jsonfile", "lazy"}  # shared by every folder, import nothing of ours
# What each folder may import from the package (besides itself and the leaves).
ALLOWED = {
    "model": set(),
    "text": set(),
    "loading": {"model", "text"},
    "generation": {"model", "text"},
    "convert": {"model", "text", "loading"},
    "app": {"model", "text", "loading", "generation"},
    "server": {"__init__", "model", "text", "loading", "generation"},
    "cli": {"__init__", "model", "text", "loading", "generation", "convert", "app", "server"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in ast.walk(node):
                if hasattr(child, "lineno"):
                    lines.add(child.lineno)
    return lines


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file, as absolute names (the type
    checker's imports left out)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(name)
            found |= {f"{name}.{a.name}" for a in node.names}  # `from . import x`
    return found


def ours(names: set[str]) -> set[str]:
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {n for n in names if n in modules}


def folder_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_folders_import_one_way():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        folder = folder_of(module_name(path))
        if folder not in ALLOWED:
            continue
        for target in ours(imports_of(path)):
            dest = folder_of(target)
            if dest not in {folder, *LEAVES, *ALLOWED[folder]}:
                wrong.append(f"{module_name(path)} imports {target}")
    assert not wrong, wrong


def test_model_needs_only_mlx_and_mlx_lm_models():
    for path in (PACKAGE / "model").rglob("*.py"):
        for name in imports_of(path):
            if name.startswith("mlx_lm"):
                assert name.startswith("mlx_lm.models"), (path.name, name)


def test_text_does_not_import_mlx():
    for path in (PACKAGE / "text").rglob("*.py"):
        assert not {n for n in imports_of(path) if n.split(".")[0] in ("mlx", "mlx_lm")}, path
    code = ("import sys, mlx_mixtral.text, mlx_mixtral.text.gguf_vocab, "
            "mlx_mixtral.text.template; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('mlx', 'mlx_lm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_import_cycle():
    graph = {module_name(p): ours(imports_of(p)) for p in PACKAGE.rglob("*.py")}
    # A package's own __init__ imported by its children is how Python works, not a cycle.
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_import_is_light():
    code = ("import sys, mlx_mixtral; "
            "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=seeing("torch"))
    assert out.stdout.strip() == "[]"


def test_help_imports_no_model_or_server_stack():
    """Every command builds the whole parser first: it must not import mlx-lm, transformers or
    the web stack (that once made `--help` take 7 s)."""
    code = ("import sys; from mlx_mixtral.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('mlx_lm', 'transformers', 'fastapi', 'uvicorn') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_api_still_importable():
    import mlx_mixtral

    for name in mlx_mixtral.__all__:
        assert getattr(mlx_mixtral, name) is not None, name
